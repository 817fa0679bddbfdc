"""Config files: ``python -m imgcls_jax.main --config=configs/<name>.py``."""
