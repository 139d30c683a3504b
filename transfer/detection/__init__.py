"""Pedestrian detection transfer (CityPersons): metrics here; reader, head and fine-tune loop alongside."""
