"""The shop's concerns, one package each. Each publishes the messages it accepts
in its own ``messages`` module; business rules live in plain functions."""
