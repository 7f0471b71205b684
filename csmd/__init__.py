"""csmd: a local, real-time voice conversation daemon for Sesame CSM-1B on MLX."""
