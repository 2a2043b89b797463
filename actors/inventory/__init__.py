"""Inventory: stock reservation per order, allocation at fulfilment."""
