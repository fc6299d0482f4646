"""FBGEMM's table-batched embedding modules, the baseline of the bag, train-step and store suites,
imported in one place; FBGEMM_MISSING says why, when the wheel does not load."""

import warnings

try:
    with warnings.catch_warnings():
        # The CPU wheel lacks FBGEMM's SSD kernels and warns about each at import.
        warnings.simplefilter("ignore", DeprecationWarning)
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            OptimType,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

    FBGEMM_MISSING = None
except (ImportError, OSError) as error:  # OSError: the wheel's library does not load with this torch
    FBGEMM_MISSING = f"{type(error).__name__}: {error}"
