"""Where inputs come from and what they look like as Arrow tables."""
