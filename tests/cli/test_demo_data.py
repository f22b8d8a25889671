"""The demo's synthetic spectra and NIRS transformers, which need no workspace."""

import pickle

import numpy as np
import pytest

from nirslake.cli.demo import SNV, Derivative, make_spectra


def test_snv_gives_each_spectrum_zero_mean_and_unit_std():
    X, _, _ = make_spectra("wheat_protein", 20, 100, seed=1)
    Z = SNV().fit_transform(X)
    np.testing.assert_allclose(Z.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(Z.std(axis=1), 1.0, atol=1e-12)


def test_snv_leaves_a_flat_spectrum_centred_not_nan():
    assert np.array_equal(SNV().fit_transform(np.full((1, 5), 3.0)), np.zeros((1, 5)))


def test_first_derivative_of_a_linear_ramp_is_its_slope():
    ramp = np.vstack([0.5 * np.arange(50.0) + 2.0, -3.0 * np.arange(50.0)])
    np.testing.assert_allclose(Derivative(order=1).fit_transform(ramp), [[0.5] * 50, [-3.0] * 50])


def test_second_derivative_of_a_linear_ramp_is_zero():
    ramp = np.tile(0.5 * np.arange(50.0), (3, 1))
    np.testing.assert_allclose(Derivative(order=2).fit_transform(ramp), 0.0, atol=1e-12)


def test_derivative_rejects_an_unsupported_order():
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        Derivative(order=3).fit(np.zeros((2, 5)))


def test_make_spectra_shapes():
    X, y, wavelengths = make_spectra("soil_carbon", 30, 120, seed=0)
    assert X.shape == (30, 120)
    assert y.shape == (30,)
    assert wavelengths.shape == (120,)
    assert np.all(np.diff(wavelengths) > 0)


def test_make_spectra_is_deterministic_by_seed():
    first = make_spectra("corn_moisture", 25, 80, seed=7)
    again = make_spectra("corn_moisture", 25, 80, seed=7)
    other = make_spectra("corn_moisture", 25, 80, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], other[0])


def test_transformers_survive_a_pickle_round_trip():
    X, _, _ = make_spectra("milk_fat", 10, 60, seed=3)
    for transformer in (SNV().fit(X), Derivative(order=2).fit(X)):
        restored = pickle.loads(pickle.dumps(transformer))
        assert type(restored) is type(transformer)
        assert restored.get_params() == transformer.get_params()
        np.testing.assert_array_equal(restored.transform(X), transformer.transform(X))
