"""Small helper modules the scripts share, one job each (see each module's docstring; trainer_utils.py holds the plumbing)."""
