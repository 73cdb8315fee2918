"""Storage: the async database handle, the tables and their Alembic migrations."""

from mesh.store.database import Database, head_revision, normalize_url
from mesh.store.types import utcnow

__all__ = ["Database", "head_revision", "normalize_url", "utcnow"]
