"""Partial FC on a class-sharded head (JAX only): each device samples its own slice of the classes.

The kernel of a ``PartialFCNormDense`` (class-major, ``(padded classes * K, emb)``) is split along its rows over
the ``axis`` of a JAX device mesh: shard ``r`` holds the classes ``[r * L, (r + 1) * L)``, ``L = padded classes /
shards``. In a step every shard keeps each class of the batch that falls in its slice and fills up with negatives
drawn from its own slice, ``count`` classes in all (PartialFC_V2 of insightface does this on each GPU); it gathers
those rows on its own device, and after the update writes them back there: the sampled rows never travel, only
the embeddings of the batch do. The cosines of the gathered rows go to the losses as the unsharded Partial FC's
do (``heads.cosines_of_centers``), the classes of shard ``r`` at columns ``[r * count, (r + 1) * count)``.

JAX only (``jax.shard_map``); the other backends use the unsharded sampling of ``heads.partial_fc_sample``.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from keras_insightface.nn.heads import sub_center_columns


def sample_shards(labels, step, *, num_classes, classes_per_shard, count, seed, mesh, axis):
    """The classes each shard samples in one step: ``(columns, remapped)``.

    ``columns`` (int32 ``(shards * count,)``, split over ``axis``) are the sampled class ids, shard by shard, each
    shard's sorted: every class of ``labels`` in its slice plus random others of its slice (never a padding class
    ``>= num_classes``). ``remapped`` (``labels.shape``) are the labels as indices into ``columns``. The draw is a
    function of ``(seed, step, shard)``; every device of a shard draws the same. The caller makes sure that
    ``count`` is at least the batch (all its classes may fall in one shard) and at most the real classes of any
    shard."""

    def per_shard(labels, step):
        shard = jax.lax.axis_index(axis)
        first = shard * classes_per_shard
        local = labels - first
        mine = (local >= 0) & (local < classes_per_shard)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step.astype("uint32")), shard)
        scores = jax.random.uniform(key, (classes_per_shard,))  # in [0, 1): the batch's classes (2) come first
        scores = jnp.where(first + jnp.arange(classes_per_shard) < num_classes, scores, -1.0)
        scores = scores.at[jnp.where(mine, local, classes_per_shard)].set(2.0, mode="drop")
        chosen = jnp.sort(jax.lax.top_k(scores, count)[1]).astype("int32")
        position = shard * count + jnp.searchsorted(chosen, local).astype("int32")
        return chosen + first, jax.lax.psum(jnp.where(mine, position, 0), axis)

    labels = jnp.reshape(labels.astype("int32"), (-1,))
    specs = dict(in_specs=(PartitionSpec(), PartitionSpec()), out_specs=(PartitionSpec(axis), PartitionSpec()))
    return jax.shard_map(per_shard, mesh=mesh, **specs)(labels, jnp.asarray(step))


def _local_rows(columns, classes_per_shard, loss_top_k, axis):
    """This shard's kernel rows of its sampled class ids: ``loss_top_k`` sub-centers each, class-major."""
    first = jax.lax.axis_index(axis) * classes_per_shard
    return sub_center_columns(columns - first, loss_top_k)


def gather_shard_rows(kernel, columns, *, classes_per_shard, loss_top_k, mesh, axis):
    """The rows of a row-sharded ``kernel`` (or of an optimizer slot laid out like it) for the sampled ``columns``
    of ``sample_shards``: ``(shards * count * K, emb)``, each shard's rows read on its own device."""

    def per_shard(kernel, columns):
        return kernel[_local_rows(columns, classes_per_shard, loss_top_k, axis)]

    spec = PartitionSpec(axis, None)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, PartitionSpec(axis)), out_specs=spec)(kernel, columns)


def scatter_shard_rows(kernel, columns, rows, *, classes_per_shard, loss_top_k, mesh, axis):
    """``kernel`` with the rows of the sampled ``columns`` replaced by ``rows`` (what ``gather_shard_rows`` read,
    updated), each shard writing its own; every other row is left as it is."""

    def per_shard(kernel, columns, rows):
        return kernel.at[_local_rows(columns, classes_per_shard, loss_top_k, axis)].set(rows)

    spec = PartitionSpec(axis, None)
    in_specs = (spec, PartitionSpec(axis), spec)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=spec)(kernel, columns, rows)
