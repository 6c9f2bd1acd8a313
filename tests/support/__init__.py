
"""What the tiers share: services (S3, PostgreSQL), helpers to run and read DAGs, the browser."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
