"""One handler per command family, registered in one table (see router.py)."""
