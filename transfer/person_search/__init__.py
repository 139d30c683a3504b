"""Person search transfer (CUHK-SYSU, PRW): metrics here; reader, detector + re-ID head and loop alongside."""
