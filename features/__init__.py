"""Frame features for vimo-env: HDF5 feature store, frame sources, synthetic and real datasets.

This layer knows nothing of reinforcement learning.
"""

from features.store import FeatureStore, FeatureStoreError, FeatureWriter

__all__ = ["FeatureStore", "FeatureStoreError", "FeatureWriter"]
