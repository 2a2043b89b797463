"""The generic ShopFlow actor runtime. Knows nothing about shops: `actors/` and
`web/` build on it, never the other way round."""
