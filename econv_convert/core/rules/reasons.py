"""Why a node has no dense form, in one place for both backends: each reason is keyed by what
the node is (``REFUSED``), and a backend refuses with the key and the names it fills in
(:func:`refuse_kind`); the walk adds the node's name and what the user can do.
"""

from __future__ import annotations

# layer kinds that are not translation-equivariant on the lattice, whatever their geometry;
# each backend maps its own ops to these
LAYER_KINDS = {
    "upsampling": "upsampling is not translation-equivariant on the lattice",
    "transposed_convolution": "a transposed convolution upsamples, which is not "
                              "translation-equivariant on the lattice",
    "depth_to_space": "depth to space (pixel shuffle) moves channels into positions: it "
                      "upsamples",
    "attention": "attention over positions mixes the whole map",
    "sampling": "sampling at computed positions (grid sampling) is not "
                "translation-equivariant",
    "region_pooling": "region pooling reads absolute positions",
    "unpooling": "unpooling writes absolute positions",
    "detection": "detection post-processing reads absolute positions",
    "subgraph": "a subgraph (If/Loop/Scan) is not supported",
    "im2col": "unfolding windows into channels (im2col) has no rule",
    "col2im": "folding channels into positions (col2im) is not translation-equivariant",
    "random_pooling": "fractional pooling is random and not equivariant",
    "expand": "expanding a spatial map repeats positions",
    "dropout_mask": "dropout's mask output is used (it is random at every position)",
    "product_of_maps": "a product of two tensors that vary over positions (attention-like)",
}

# what a node does to a map that has no dense form; ``{names}`` are filled in by the backend
USES = {
    "pool_indices": "{what} with its indices output (the indices are positions, not "
                    "features)",
    "flatten_positions": "{what} a flatten of spatial positions",
    "computed_from_size": "{what} a value computed from a spatial size",
    "varies_over_positions": "{what} varying over positions",
    "tensor_from_size": "{what} makes a tensor from a spatial size (a tensor indexed by "
                        "positions is not translation-equivariant)",
    "reshape_from_size": "a reshape to a shape computed from a spatial size (a tensor shaped "
                         "by positions)",
    "slice_bound_from_size": "a slice bound computed from a spatial size on a channel dim",
    "spatial_batch_slice": "a spatial slice of dim 0 or 1",
    "gather_spatial": "gathering along a spatial dim reads absolute positions",
    "single_position": "indexing a single spatial position",
    "advanced_index_space": "advanced indexing over space",
    "advanced_index": "advanced indexing",
    "computed_index": "indexing with a computed index or step",
    "size_index": "indexing a size with a computed index",
    "two_ellipses": "indexing with two ellipses",
    "list_slice": "indexing a list of tensors with a slice",
    "write_positions": "writing into a slice of spatial positions",
    "write_other_lattice": "writing a value into a map on another lattice",
    "merged_with_others": "an op that combines merged spatial positions with other tensors",
    "merged_parameter": "{what} with a parameter on merged spatial positions",
    "spatial_reduction": "{what} over spatial dims (only mean, max, min and sum pools have a "
                         "rule)",
    "dtype_over": "{what} with a dtype over {where}",
    "softmax_no_dim": "softmax without dim",
    "expanded_use": "an expanded value used by something other than an element-wise op",
    "expand_extra": "expanding a value with extra dims to a fixed shape",
    "expand_shape": "expanding {base} to {out} changes more than size-1 dims",
    "linear_extra_rank": "a fully connected layer on a tensor of rank other than 2 with extra "
                         "dims",
    "linear_transposed_input": "a fully connected layer with a transposed input (Gemm transA) "
                               "on a spatial map",
    "linear_on_map": "{what} on a map ({what} takes 2-D inputs)",
    "batchnorm_training": "batch normalization in training mode (its statistics outputs make "
                          "onnxruntime normalize with the batch's statistics, which differ "
                          "between the lattice and the dense map); export the model in eval "
                          "mode, with one output",
    "batchnorm_no_statistics": "{what} without running statistics normalizes over positions",
    "norm_statistics": "layer normalization's mean/inv-std outputs are used",
    "computed_norm_type": "power-average pooling with a computed norm_type",
    "flat_output": "the output flattens a map of one position at the example (global_pool="
                   "{mode} has no form for it: at larger inputs it has more positions)",
    "scalar_expected": "{what}: a second tensor argument where an element-wise op expects a "
                       "scalar",
}

# what a graph or its arguments must be for any rule to read them
READING = {
    "image_inputs": "expected one image input, found {n}: {names}",
    "model_input": "the model input must be a batched tensor (N, C, spatial...) with 1 to 3 "
                   "spatial dims",
    "argument_count": "expected {n} values, got {got}",
    "not_a_tensor": "expected a tensor {what}",
    "not_produced": "input '{name}' is not produced by any node",
    "no_shape": "input '{name}' has no known shape",
    "no_inferred_shape": "shape inference could not find the shape of '{name}' at the example "
                         "input",
    "needs_constant": "{what} must be a constant",
    "axis_range": "axis {axis} out of range for rank {rank}",
    "auto_pad": "auto_pad '{what}' is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER",
    "concat_non_tensor": "concatenating something that is not a tensor",
    "tensor_attribute": "tensor attribute '{what}'",
    "no_module_rule": "no rule for module type {what}",
    "domain_op": "operator {what} has no rule on a spatial map",
}

# what the core's own rules refuse (the layer kinds above are each backend's ops)
CORE = {
    "no_rule": "no rule for {what} on a spatial map; it may mix positions, which would break "
               "equivalence on the lattice",
    "on_merged": "{what} on merged spatial positions (only a mean, max, min or sum over them has "
                 "a rule: global pooling)",
    "output_flatten": "the output is a flatten over spatial positions; only {linear_layer} may "
                      "consume such a flatten",
    "output_merged": "the output merges spatial positions into one dim; only a reduction over "
                     "them may consume it",
    "second_global_pool": "global pooling of a map that already has extra dims (a second global "
                          "pool after a phase- or window-pooled one)",
    "reduction_besides_merged": "a reduction over other dims than the merged spatial positions",
    "reduction_with_batch": "{what} over every dim, batch included",
    "on_flatten": "{what} a flatten of spatial positions",
    "linear_flatten_order": "a fully connected layer over a flatten that is not (N, C, "
                            "spatial...) in channels-first order",
    "over_spatial_dim": "{what} over a spatial dim mixes positions",
    "with_extra_dims": "{what} a map with extra dims",
    "spatial_statistics": "{what} normalizes with statistics over spatial positions, which "
                          "differ between the lattice and the dense map",
    "phase_pooled_axis": "a phase-pooled value meets a map without that spatial axis",
    "phase_pooled_step": "a phase-pooled value (step {step}) scales a map on step {other}",
    "phase_pooled_dim": "a phase-pooled value meets a map along a dim it was not pooled over",
    "other_lattices": "operands on different lattices (their strides differ); their baseline "
                      "maps have equal sizes only by accident of the input size",
    "positional_tensor": "adds or multiplies a tensor that varies over space (a positional "
                         "embedding is not translation-equivariant)",
    "window_pooled_meets_map": "a window-pooled value meets the map it was pooled from (as in "
                               "squeeze-and-excitation): each position would need its own window "
                               "of the map, which has no dense form",
    "other_extra_dims": "operands with different extra dims",
    "reshape_unmatched": "reshape {base} -> {out} cannot be matched dim by dim",
    "window_partition": "moves spatial positions into the batch (a window partition), which is "
                        "not translation-equivariant on the lattice",
    "split_spatial": "splits a spatial dim in a way that is not a window partition",
    "flatten_order": "a flatten of channels and space that is not in channels-first order",
    "reshape_mixes": "reshape {base} -> {out} mixes spatial positions with other dims",
    "circular_padding": "circular padding of a map on a lattice wraps to the wrong phase (it is "
                        "not translation-equivariant on the lattice)",
    "slice_computed_step": "a spatial slice with a computed step",
    "slice_negative_step": "a spatial slice with a negative step",
    "concat_layouts": "concatenation of tensors with different layouts",
    "concat_lattices": "concatenating maps on different lattices",
    "concat_spatial": "concatenation along a spatial dim is not translation-equivariant",
    "along_spatial": "{what} along a spatial dim",
    "squeeze_spatial": "squeezing a spatial dim of size 1 (its dense size can be larger)",
    "adaptive_pool": "adaptive pooling from {size} to {out}: the windows depend on the input "
                     "size and are not translation-equivariant on the lattice",
}

REFUSED = {**LAYER_KINDS, **USES, **READING, **CORE}

# what the user can do, where an option helps
HINTS = {
    "second_global_pool": "global_pool=lattice pools the lattice only",
    "window_pooled_meets_map": "global_pool=phase keeps one value per lattice phase",
    "adaptive_pool": "give an input_shape=... at which the map there is a multiple of {out}",
    "flat_output": "global_pool=window gives one output per window position; lattice gives "
                   "the baseline's own output",
}
