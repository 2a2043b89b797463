"""Demo data: real CDNOW orders, and a catalogue generated from a seed.

The CDNOW files (ops/data/CDNOW_sample.txt and CDNOW_master.txt, from the `lifetimes` package,
collected by Fader and Hardie) gives real customers, dates and basket sizes.
It has no products, names, e-mails or stock; those are GENERATED here,
deterministically from :data:`SEED`, so every run and every machine sees the
same shop:

- 240 CDs with made-up titles, prices between R$ 9,90 and R$ 39,90 (about the
  unit prices in the data, read as R$), a few of them "hits" that most
  orders pick, and stock levels from 30 to 400 units so the hits can sell out.
- one customer per CDNOW customer id, named "Cliente NNNNN" with an address
  at example.com.br.
- an order of N CDs becomes up to 4 lines of those CDs (quantities adding up to
  N); its total is recomputed from the catalogue prices.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg

SEED = 1997
PRODUCT_COUNT = 240
MAX_LINES_PER_ORDER = 4
DATA_FILE = Path(__file__).resolve().parents[2] / "ops" / "data" / "CDNOW_sample.txt"

_ADJECTIVES = ["Blue", "Electric", "Midnight", "Golden", "Silent", "Wild", "Velvet", "Neon",
               "Broken", "Endless", "Crimson", "Paper", "Northern", "Secret", "Lonely", "Bright"]
_NOUNS = ["Horizon", "Rivers", "Echoes", "Parade", "Garden", "Machines", "Highway", "Letters",
          "Mirrors", "Summer", "Satellites", "Harbor", "Dreams", "Avenue", "Fever", "Tides"]
_ARTISTS = ["The Low Frequencies", "Ana Sol", "Os Mutantes Novos", "Kite Theory", "Marina Vale",
            "Static Bloom", "Quarteto Azul", "Jonas Reed", "The Paper Boats", "Luz Rara"]


@dataclass(frozen=True)
class Product:
    id: int
    sku: str
    name: str
    price_cents: int
    stock: int
    external_id: str


@dataclass(frozen=True)
class CdnowOrder:
    """One line of the CDNOW file: a real purchase."""

    source: str
    line_no: int
    customer_id: int
    day: date
    cds: int
    dollar_value: float

    @property
    def external_ref(self) -> str:
        return f"cdnow-{self.source}:{self.line_no}"


def generate_products(seed: int = SEED, stock_multiplier: int = 1) -> list[Product]:
    """The generated catalogue (same result for the same seed).

    ``stock_multiplier`` scales every stock level (benchmarks use it so that
    the full master file does not sell the shop out).
    """
    rng = random.Random(seed)
    products = []
    for pid in range(1, PRODUCT_COUNT + 1):
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} — {rng.choice(_ARTISTS)}"
        price = rng.randrange(990, 3991, 100)
        hit = pid <= 12
        stock = rng.randint(30, 60) if hit else rng.randint(80, 400)
        products.append(Product(pid, f"CD-{pid:05d}", name, price, stock * stock_multiplier,
                                f"WH-{pid:05d}"))
    return products


MASTER_FILE = DATA_FILE.with_name("CDNOW_master.txt")


def _columns(parts: list[str], where: str) -> tuple[str, str, str, str]:
    """customer, date, cds, value from a sample line (5 columns) or a master line (4)."""
    if len(parts) == 5:
        return parts[0], parts[2], parts[3], parts[4]
    if len(parts) == 4:
        return parts[0], parts[1], parts[2], parts[3]
    raise ValueError(f"{where}: expected 4 or 5 columns, got {len(parts)}")


def load_orders(path: Path = DATA_FILE, limit: int | None = None) -> list[CdnowOrder]:
    """The CDNOW purchases in date order (stable for ties), at most ``limit``.

    Reads both shipped files: the sample (5 columns, no header) and the
    master file (4 columns, one header line).
    """
    orders = []
    source = "master" if path.name == MASTER_FILE.name else "sample"
    with path.open() as fh:
        for line_no, line in enumerate(fh, start=1):
            parts = line.split()
            if line_no == 1 and parts and not parts[0].isdigit():
                continue  # the master file's header
            customer, day, cds, value = _columns(parts, f"{path.name}:{line_no}")
            orders.append(CdnowOrder(source, line_no, int(customer), datetime.strptime(day, "%Y%m%d").date(),
                                     int(cds), float(value)))
    orders.sort(key=lambda o: (o.day, o.line_no))
    return orders[:limit] if limit else orders


def _weight(pid: int) -> float:
    return 12.0 if pid <= 12 else 1.0


def basket(order: CdnowOrder, products: list[Product]) -> list[tuple[int, int]]:
    """The (product_id, quantity) lines of an order: deterministic per order."""
    digest = hashlib.sha256(f"{SEED}:{order.line_no}".encode()).digest()
    rng = random.Random(digest)
    n_lines = max(1, min(order.cds, MAX_LINES_PER_ORDER))
    ids = [p.id for p in products]
    chosen: list[int] = []
    while len(chosen) < n_lines:
        pid = rng.choices(ids, weights=[_weight(i) for i in ids])[0]
        if pid not in chosen:
            chosen.append(pid)
    quantities = [1] * n_lines
    for _ in range(order.cds - n_lines):
        quantities[rng.randrange(n_lines)] += 1
    return list(zip(chosen, quantities))


def customer_email(customer_id: int) -> str:
    return f"cliente{customer_id:05d}@example.com.br"


async def seed(conn: asyncpg.Connection, orders: list[CdnowOrder],
               stock_multiplier: int = 1) -> tuple[int, int]:
    """Insert the catalogue, stock and the orders' customers; a re-run changes nothing."""
    products = generate_products(stock_multiplier=stock_multiplier)
    customers = sorted({o.customer_id for o in orders})
    async with conn.transaction():
        await conn.executemany(
            """INSERT INTO products (id, sku, name, price_cents) VALUES ($1, $2, $3, $4)
               ON CONFLICT (id) DO NOTHING""",
            [(p.id, p.sku, p.name, p.price_cents) for p in products],
        )
        await conn.executemany(
            """INSERT INTO inventory (product_id, quantity, external_id, synced_at) VALUES ($1, $2, $3, $4)
               ON CONFLICT (product_id) DO NOTHING""",
            [(p.id, p.stock, p.external_id, datetime.now(UTC)) for p in products],
        )
        await conn.executemany(
            "INSERT INTO customers (id, name, email) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
            [(c, f"Cliente {c:05d}", customer_email(c)) for c in customers],
        )
    return len(products), len(customers)
