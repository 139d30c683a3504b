"""Human parsing transfer (LIP, CIHP): metrics here; reader, segmentation head and loop alongside."""
