"""The fulfilment flow: paid -> allocated -> processing -> label_created -> ready_to_ship."""
