"""privdom-ray: Ray-distributed sweeps of privacy-preserving domain transfer for chest radiographs."""

__version__ = "0.1.0"
