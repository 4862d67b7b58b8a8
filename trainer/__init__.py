"""Small helper modules the scripts share, one job each (see each module's docstring)."""
