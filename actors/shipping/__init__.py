"""Adapters to the carrier (shipping labels) and the warehouse (packing requests).

The fulfilment flow depends on the :class:`~actors.shipping.gateway.ShippingGateway`
Protocol only; :class:`~actors.shipping.gateway.HttpShippingGateway` is the real one.
"""
