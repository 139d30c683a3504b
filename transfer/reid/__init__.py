"""Person re-identification transfer: Market-1501 / MSMT17 / DukeMTMC-reID / CUHK03-NP fine-tuning and evaluation."""
