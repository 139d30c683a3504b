"""Run by .ci/run with a regular (non-editable) install, from a folder outside the checkout: the installed
copy must find the shipped default vocabularies and the demo configs (pipeline.resources)."""

import pipeline
from pipeline.ablate import DEMO_CONFIG, AblationConfig, repo_path
from pipeline.config import load_config
from pipeline.vocab import load_attributes, load_parts
from pretrain.config import PretrainConfig

assert "site-packages" in pipeline.__file__, f"imported {pipeline.__file__}, not the installed copy"
demo = load_config(AblationConfig, DEMO_CONFIG)
pretrain = load_config(PretrainConfig, repo_path(demo.pretrain_config))
print(
    f"installed copy {pipeline.__file__}: {len(load_attributes().attributes)} attributes, "
    f"{len(load_parts().names)} parts, demo config pre-trains {pretrain.model.arch}"
)
