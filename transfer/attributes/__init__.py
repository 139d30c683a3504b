"""Pedestrian attribute recognition transfer: PA-100K / PETA / RAP (v1, v2) and the PETA_ZS / RAP_ZS splits."""
