"""Abandoned carts: one reminder e-mail for a known customer's idle cart, through a delayed job."""
