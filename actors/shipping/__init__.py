"""Adapters to the carrier (shipping labels) and the warehouse (packing requests).

The fulfilment flow depends on its ``ShippingGateway`` Protocol only
(``actors/fulfillment/adapters.py``); :class:`~actors.shipping.gateway.HttpShippingGateway`
is the HTTP implementation.
"""
