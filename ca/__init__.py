"""A small SPIFFE CA: issues X.509-SVIDs, keeps an SQLite index, revokes and verifies (see ``ca --help``)."""
