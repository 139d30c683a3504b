"""Text-to-person retrieval (CUHK-PEDES, ICFG-PEDES, RSTPReid): text queries against a gallery of person images."""
