"""Lets `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` load this folder.

The pipeline is flexvar-hf's own class, imported from the installed flexvar-hf package; nothing else runs.
`flexvar_hf.FlexVARPipeline.from_pretrained` loads the folder without this file.
"""

from flexvar_hf import FlexVARPipeline  # noqa: F401
