"""E-mail: one e-mail per logical key, through a pluggable transport."""
