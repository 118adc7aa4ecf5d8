"""Evaluation of class-conditional FlexVAR pipelines: reproducible sharded sampling and the ADM suite's metrics.

Importing this package needs only torch; torch-fidelity (the Inception network, `pip install flexvar-hf[eval]`) is
imported when features are first extracted. See docs/evaluation.md.
"""

from .inception import InceptionFeatures, find_inception_weights, save_random_inception_weights
from .metrics import (
    FeatureStatistics,
    frechet_distance,
    frechet_distance_of_features,
    inception_score,
    manifold_radii,
    precision_recall,
)
from .npz import iter_npz_batches, npz_array_header, write_npz
from .pipeline_evaluation import (
    check_reference,
    evaluate_pipeline,
    process_state,
    resolve_sampling,
    score_features,
)
from .sampling import SamplePlan, SampleShards, generate_samples, sample_seed, to_uint8_images

__all__ = [
    "FeatureStatistics",
    "InceptionFeatures",
    "SamplePlan",
    "SampleShards",
    "check_reference",
    "evaluate_pipeline",
    "find_inception_weights",
    "frechet_distance",
    "frechet_distance_of_features",
    "generate_samples",
    "inception_score",
    "iter_npz_batches",
    "manifold_radii",
    "npz_array_header",
    "precision_recall",
    "process_state",
    "resolve_sampling",
    "sample_seed",
    "save_random_inception_weights",
    "score_features",
    "to_uint8_images",
    "write_npz",
]
