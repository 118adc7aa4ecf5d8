"""Training helpers shared by `examples/train.py` (FlexVAR transformer) and `examples/train_vq.py` (tokenizer).

- `flexvar_hf.training.checkpointing`: atomic accelerate checkpoints, pruning, `latest`, resuming.
- `flexvar_hf.training.data`: image datasets (hub or imagefolder), transforms without torchvision, seeded loaders.
- `flexvar_hf.training.flexvar_loss`: teacher-forcing inputs from the VQ model, label dropout, loss and accuracy.
- `flexvar_hf.training.growth`: config copies for `from_config`, and depth growth with unchanged outputs.
- `flexvar_hf.training.master_weights`: bfloat16 linear weights with float32 masters in the optimizer.
- `flexvar_hf.training.optim`: AdamW parameter groups without weight decay on biases, norms and embeddings.

The submodules are imported on demand (`from flexvar_hf.training.data import ...`) so that importing one does not
pull in the dependencies of the others.
"""
