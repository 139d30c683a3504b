"""Top-down pose transfer (COCO keypoints): metrics here; reader, head and fine-tune loop alongside."""
