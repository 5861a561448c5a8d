import numpy as np
import pytest

from lorlib_ui.core.errors import LorlibError
from lorlib_ui.training.mbc import adjusted_rand_index, embed, mbc_cluster, silhouette_by_k, sparsify


def _family_experts(n_families=3, per_family=4, dim=400, noise=0.3, seed=0):
    """Experts whose weights are a family direction plus noise: clustering must recover families."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_families, dim))
    names, vectors, families = [], [], []
    for f in range(n_families):
        for i in range(per_family):
            names.append(f"f{f}_t{i}")
            vectors.append(centres[f] + noise * rng.normal(size=dim))
            families.append(f"family{f}")
    return names, vectors, families


def test_sparsify_keeps_entries_above_each_rows_quantile():
    rows = np.array([[0.1, -0.5, 0.2, -0.05, 0.9, 0.3], [4.0, 3.0, -2.0, 1.0, 0.0, -5.0]], dtype=np.float32)
    expected = np.where(np.abs(rows) > np.quantile(np.abs(rows), 0.5, axis=1, keepdims=True), rows, 0)
    kept = sparsify(rows, 0.5)
    assert kept is rows  # in place
    assert np.array_equal(kept, expected) and (np.count_nonzero(kept, axis=1) == 3).all()


def test_clusters_recover_families():
    names, vectors, families = _family_experts()
    embedding = embed(names, vectors)
    assert embedding.vectors.shape == (12, 12)  # at most one dimension per expert
    assert np.allclose(np.linalg.norm(embedding.vectors, axis=1), 1.0)
    assert np.allclose(np.diag(embedding.similarity), 1.0)
    labels = mbc_cluster(embedding, 3)
    assert adjusted_rand_index(labels, families) == pytest.approx(1.0)
    scores = silhouette_by_k(embedding, range(2, 8))
    assert set(scores) == set(range(2, 8)) and max(scores, key=scores.get) == 3


def test_same_seed_same_clusters():
    """The embedding is exact (nothing random in it), and k-means' seed fixes the clusters."""
    names, vectors, _ = _family_experts(noise=2.0)
    first, second = embed(names, vectors), embed(names, vectors)
    assert np.array_equal(first.vectors, second.vectors)
    runs = [mbc_cluster(first, 4, seed=1), mbc_cluster(second, 4, seed=1)]
    assert (runs[0] == runs[1]).all()


def test_bad_inputs():
    names, vectors, _ = _family_experts()
    with pytest.raises(LorlibError, match="k must be between 1 and the number of clustered experts"):
        mbc_cluster(embed(names, vectors), 13)
    with pytest.raises(LorlibError, match="at least 2 experts"):
        embed(names[:1], vectors[:1])
    with pytest.raises(LorlibError, match="same modules with the same ranks"):
        embed(names[:2], [vectors[0], vectors[1][:10]])
    with pytest.raises(LorlibError, match="sparsity quantile"):
        embed(names, vectors, keep_quantile=1.0)


def test_two_experts_can_form_two_clusters():
    """With one SVD dimension, two experts' unit vectors are +-1 and their similarity rows can
    coincide; the embedding keeps as many dimensions as experts so they stay apart."""
    rng = np.random.default_rng(0)
    common = rng.normal(size=200)  # a shared component: both project onto it with the same sign
    vectors = [common + 0.5 * rng.normal(size=200), common + 0.5 * rng.normal(size=200)]
    labels = mbc_cluster(embed(["a", "b"], vectors), k=2)
    assert sorted(labels.tolist()) == [0, 1]


def test_gram_coordinates_are_the_exact_truncated_svd():
    """U_k Σ_k from the Gram matrix equals numpy's SVD (up to the sign of each component), for
    wide matrices (experts << weights) and tall ones."""
    from lorlib_ui.training.mbc import gram_coordinates

    rng = np.random.default_rng(3)
    for shape in ((12, 500), (40, 9)):
        matrix = rng.normal(size=shape).astype(np.float32)
        u, sigma, _ = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
        ours = gram_coordinates((matrix @ matrix.T).astype(np.float64), 5)
        assert np.allclose(np.abs(ours), np.abs(u[:, :5] * sigma[:5]), atol=1e-3)


def test_k_means_on_reduced_rows_equals_k_means_on_the_similarity_rows():
    """MBC clusters the rows of the similarity matrix; it computes them on n x d rows with the
    same pairwise distances, and the clusters are the same."""
    from sklearn.cluster import KMeans
    from sklearn.metrics.pairwise import euclidean_distances

    from lorlib_ui.training.mbc import similarity_rows

    names, vectors, _ = _family_experts(n_families=5, per_family=30, dim=300, noise=1.5)
    embedding = embed(names, vectors)
    reduced = similarity_rows(embedding)
    assert reduced.shape == (150, 64)
    np.testing.assert_allclose(euclidean_distances(reduced), euclidean_distances(embedding.similarity), atol=1e-8)
    for k in (3, 5, 8):
        rows = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=0).fit_predict(embedding.similarity)
        assert adjusted_rand_index(mbc_cluster(embedding, k), rows) == pytest.approx(1.0)
