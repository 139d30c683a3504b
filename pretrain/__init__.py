"""CLASP pre-training. Importing the package registers the CLASP backbones as timm models (``clasp_<arch>``)."""

from pretrain import timm_models as _timm_models  # noqa: F401  (registration is the import's effect)
