"""Small helper modules the training scripts share, one job each (trainer_utils.py holds the plumbing)."""
