"""Organ-pooled features (volumevlm.models.anatomy) against hand computations, and the
report head's ``organs`` findings classifier: its width, its one-line errors, and a
save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volumevlm.errors import VolumeVLMError
from volumevlm.models.anatomy import (
    ORGAN_HU_BINS,
    ORGAN_HU_EDGES,
    organ_histograms,
    organ_histograms_by,
    organ_labels,
    organ_statistics_width,
    organ_token_means,
)
from volumevlm.models.encoder import EncoderConfig
from volumevlm.models.report import ReportConfig, finding_feature_width, image_finding_features
from volumevlm.models.segmentation import SegmentationConfig, SegmentationNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_token_means_weigh_each_token_by_the_share_of_its_cell_inside_the_organ():
    # A 4x2x2 image under a 2x1x1 token grid: token 0 covers x 0..1, token 1 x 2..3.
    labels = torch.zeros(1, 4, 2, 2, dtype=torch.long)
    labels[0, 0:2] = 1          # organ 1 fills token 0's cell
    labels[0, 2, 0, 0] = 1      # and an eighth of token 1's cell
    labels[0, 3] = 2            # organ 2: half of token 1's cell
    tokens = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [99.0, 99.0]]])  # the last row is a register
    means = organ_token_means(tokens, (2, 1, 1), labels, num_classes=4)
    assert means.shape == (1, 3, 2)
    expected_1 = (1.0 * torch.tensor([1.0, 10.0]) + 0.125 * torch.tensor([3.0, 30.0])) / 1.125
    torch.testing.assert_close(means[0, 0], expected_1)
    torch.testing.assert_close(means[0, 1], torch.tensor([3.0, 30.0]))
    torch.testing.assert_close(means[0, 2], torch.zeros(2))  # organ 3 absent: zeros, same layout


def test_legacy_histograms_count_each_organs_own_voxels_in_16_equal_bins():
    labels = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    labels[0, 0] = 1  # four voxels
    images = torch.zeros(1, 1, 2, 2, 2)
    images[0, 0, 0] = torch.tensor([[0.0, 0.26], [0.99, 1.0]])
    out = organ_histograms(images, labels, num_classes=3, statistics="hu16")
    assert out.shape == (1, 2, 1 + ORGAN_HU_BINS) == (1, 2, organ_statistics_width("hu16"))
    # share of the 8 voxels, then 16 bins of 1/16: 0.0 in bin 0, 0.26 in bin 4, 0.99 and 1.0 in bin 15
    expected = torch.zeros(1 + ORGAN_HU_BINS)
    expected[0], expected[1 + 0], expected[1 + 4], expected[1 + 15] = 0.5, 0.25, 0.25, 0.5
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], torch.zeros(1 + ORGAN_HU_BINS))


def test_fine_histograms_count_the_organ_grown_by_one_voxel_in_hu_bins():
    # A 5x1x1 line: organ 1 at x=1, organ 2 at x=4; grown by one voxel, organ 1 covers x 0..2
    # and organ 2 x 3..4 (the grown masks may overlap other organs; here they do not).
    labels = torch.tensor([0, 1, 0, 0, 2]).view(1, 5, 1, 1)
    window = (-1000.0, 1000.0)
    hu = torch.tensor([5.0, 45.0, 1200.0, -2000.0, 150.0])  # outside the window: clamped to its edges
    images = ((hu.clamp(*window) - window[0]) / (window[1] - window[0])).view(1, 1, 5, 1, 1)
    out = organ_histograms(images, labels, num_classes=3, statistics="hu_fine_dilated", hu_window=window)
    bins = len(ORGAN_HU_EDGES) - 1
    assert out.shape == (1, 2, 1 + bins) == (1, 2, organ_statistics_width())

    def bin_of(value):  # [edge_i, edge_i+1), the top edge in the last bin
        return min(int(np.searchsorted(ORGAN_HU_EDGES, value, side="right")) - 1, bins - 1)

    first = torch.zeros(1 + bins)
    first[0] = 3 / 5
    for value in (5.0, 45.0, 1000.0):
        first[1 + bin_of(value)] += 1 / 3
    second = torch.zeros(1 + bins)
    second[0] = 2 / 5
    for value in (-1000.0, 150.0):
        second[1 + bin_of(value)] += 1 / 2
    torch.testing.assert_close(out[0, 0], first)
    torch.testing.assert_close(out[0, 1], second)
    assert bin_of(5.0) != bin_of(45.0)  # fluid and parenchyma fall in different bins
    # The square-root recipe: the same counts, each value's root (small fractions spread apart).
    rooted = organ_histograms(images, labels, num_classes=3, statistics="hu_fine_dilated_sqrt", hu_window=window)
    assert rooted.shape == out.shape and organ_statistics_width("hu_fine_dilated_sqrt") == 1 + bins
    torch.testing.assert_close(rooted[0, 0], first.sqrt())
    torch.testing.assert_close(rooted[0, 1], second.sqrt())
    both = organ_histograms_by(images, labels, 3, ["hu_fine_dilated_sqrt", "hu16", "hu_fine_dilated"], window)
    assert set(both) == {"hu_fine_dilated_sqrt", "hu16", "hu_fine_dilated"}
    for recipe, value in both.items():
        torch.testing.assert_close(value, organ_histograms(images, labels, 3, recipe, window))
    torch.testing.assert_close(organ_histograms_by(images, labels, 3, ["hu_fine_dilated_sqrt"], window)["hu_fine_dilated_sqrt"],
                               rooted)
    with pytest.raises(VolumeVLMError, match="hu_window"):
        organ_histograms(images, labels, num_classes=3)
    with pytest.raises(VolumeVLMError, match="must be one of"):
        organ_histograms(images, labels, num_classes=3, statistics="hu99", hu_window=window)


def test_shape_mismatches_are_one_line_errors():
    with pytest.raises(VolumeVLMError, match="do not match grid"):
        organ_token_means(torch.zeros(1, 3, 2), (2, 2, 1), torch.zeros(1, 4, 4, 2, dtype=torch.long), 3)
    with pytest.raises(VolumeVLMError, match="differ"):
        organ_histograms(torch.zeros(1, 1, 4, 4, 2), torch.zeros(1, 4, 4, 4, dtype=torch.long), 3)
    with pytest.raises(VolumeVLMError, match="at least one organ"):
        organ_token_means(torch.zeros(1, 4, 2), (2, 2, 1), torch.zeros(1, 4, 4, 2, dtype=torch.long), 1)


def _net() -> SegmentationNet:
    encoder = EncoderConfig(image_size=(16, 16, 16), patch_size=(4, 4, 4), dim=16, depth=2, heads=2, num_registers=1)
    return SegmentationNet(encoder, SegmentationConfig(feature_size=4, roi_size=(16, 16, 16), decoder="fused"))


def test_organ_labels_are_the_heads_argmax_on_the_grid_the_encoder_reads():
    torch.manual_seed(0)
    net = _net().train()
    images = torch.rand(2, 1, 16, 16, 16)
    labels = organ_labels(net, images)
    assert net.training  # the caller's mode is kept
    with torch.no_grad():
        expected = net.eval()(images).argmax(dim=1)
    assert labels.shape == (2, 16, 16, 16) and torch.equal(labels, expected)
    with pytest.raises(VolumeVLMError, match="must be"):
        organ_labels(net, torch.rand(2, 16, 16, 16))


def test_an_organs_report_config_sizes_its_classifier_and_checks_its_inputs():
    config = ReportConfig(findings=("ascites", "splenomegaly"), findings_features="organs", organ_classes=15)
    assert finding_feature_width(config, 64) == 14 * (64 + 1 + len(ORGAN_HU_EDGES) - 1)
    legacy = ReportConfig(findings=("ascites",), findings_features="organs", organ_classes=15, organ_statistics="hu16")
    assert finding_feature_width(legacy, 64) == 14 * (64 + 1 + ORGAN_HU_BINS)
    with pytest.raises(VolumeVLMError, match="organ statistics must be one of"):
        ReportConfig(findings_features="organs", organ_classes=15, organ_statistics="hu99")
    assert finding_feature_width(ReportConfig(findings=("ascites",)), 64) == 128
    assert ReportConfig.from_dict(config.to_dict()) == config
    assert ReportConfig.from_dict({}).findings_features == "grid"  # heads saved before it existed
    with pytest.raises(VolumeVLMError, match="findings_features must be one of"):
        ReportConfig(findings_features="everywhere")
    with pytest.raises(VolumeVLMError, match="needs organ_classes"):
        finding_feature_width(ReportConfig(findings=("ascites",), findings_features="organs"), 64)


def test_organ_features_of_a_head_equal_the_pooled_parts_in_order():
    torch.manual_seed(0)
    net = _net().eval()
    images = torch.rand(2, 1, 16, 16, 16)
    tokens = torch.randn(2, 4 * 4 * 4 + 1, 16)

    class Head:
        config = ReportConfig(findings=("ascites",), findings_features="organs",
                              organ_classes=net.config.num_classes)

    window = (-1000.0, 1000.0)
    features = image_finding_features(Head, tokens, (4, 4, 4), images, net, hu_window=window)
    labels = organ_labels(net, images)
    means = organ_token_means(tokens, (4, 4, 4), labels, net.config.num_classes)
    histograms = organ_histograms(images, labels, net.config.num_classes, "hu_fine_dilated", window)
    torch.testing.assert_close(features, torch.cat([means, histograms], dim=-1).flatten(1))
    assert features.shape[1] == finding_feature_width(Head.config, 16)
    with pytest.raises(VolumeVLMError, match="need the images"):
        image_finding_features(Head, tokens, (4, 4, 4))

    class Other:
        config = ReportConfig(findings=("ascites",), findings_features="organs", organ_classes=5)

    with pytest.raises(VolumeVLMError, match="fitted on 4 organs"):
        image_finding_features(Other, tokens, (4, 4, 4), images, net, hu_window=window)


# ---------------------------------------------------------------------- the anatomy head


def test_each_finding_is_read_in_the_section_that_states_it_most():
    from volumevlm.train.anatomy import finding_sections_of

    reports = ["SPLEEN: Splenomegaly.\nKIDNEYS AND URETERS: Small renal cyst.\nIMPRESSION: Splenomegaly.",
               "SPLEEN: Enlarged spleen.\nKIDNEYS AND URETERS: No hydronephrosis.",
               "LIVER AND BILIARY TREE: Normal liver.\nSPLEEN: Unremarkable spleen."]
    routing = finding_sections_of(reports, ["splenomegaly", "renal_cyst", "hydronephrosis", "ascites"],
                                  ["LIVER AND BILIARY TREE", "SPLEEN", "KIDNEYS AND URETERS"])
    # Denied or never stated: not routed (read in the global embedding).
    assert routing == {"splenomegaly": "SPLEEN", "renal_cyst": "KIDNEYS AND URETERS"}


class _TextTable:
    """A stand-in for the VolumeVLM's frozen text tower: fixed unit embeddings per text."""

    def __init__(self, table):
        self.table = table

    def encode_text(self, texts):
        return torch.stack([self.table[t] for t in texts])


def test_the_fit_is_scikit_learns_ridge_folded_into_the_head_and_reads_held_out_cases():
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from volumevlm.models.anatomy import AnatomyHead
    from volumevlm.train.anatomy import ANATOMY_ALPHAS, fit_anatomy_head

    generator = torch.Generator().manual_seed(0)
    n, organs, channels = 120, 3, 4
    means = torch.randn(n + 40, organs, channels, generator=generator)
    enlarged = means[:, 1, 0] > 0  # the spleen's (organ 2) first channel says it
    texts = {True: "SPLEEN: Splenomegaly.", False: "SPLEEN: Unremarkable spleen."}
    table = {texts[True]: torch.tensor([1.0, 0.0, 0.0]), texts[False]: torch.tensor([0.0, 1.0, 0.0])}
    reports = [f"{texts[bool(e)]}\nIMPRESSION: None." for e in enlarged[:n]]
    head, info = fit_anatomy_head(_TextTable(table), means[:n], reports, ["splenomegaly"], organ_classes=organs + 1,
                                  sections=["SPLEEN", "LIVER AND BILIARY TREE"])
    assert isinstance(head, AnatomyHead) and head.sections == ("SPLEEN",)  # no liver section in any report
    assert head.finding_sections == {"splenomegaly": "SPLEEN"} and info["train_cases"] == n
    # The same prediction as scikit-learn's, standardization folded into the weights.
    x = means[:n].flatten(1).double().numpy()
    scaler = StandardScaler().fit(x)
    targets = torch.stack([table[texts[bool(e)]] for e in enlarged[:n]]).double().numpy()
    ridge = RidgeCV(alphas=ANATOMY_ALPHAS).fit(scaler.transform(x), targets)
    expected = torch.nn.functional.normalize(
        torch.from_numpy(ridge.predict(scaler.transform(means[n:].flatten(1).double().numpy()))).float(), dim=-1)
    out = head(means[n:])
    assert out.shape == (40, 1, 3)
    torch.testing.assert_close(out[:, 0], expected, atol=1e-4, rtol=1e-4)
    assert info["sections"]["SPLEEN"]["alpha"] == pytest.approx(float(ridge.alpha_))
    # Held-out cases land nearer their own section's text.
    closer = (out[:, 0, 0] > out[:, 0, 1])
    assert (closer == enlarged[n:]).float().mean() >= 0.9
    # Round trip through the head config.
    again = AnatomyHead.from_head_config(head.head_config())
    again.load_state_dict(head.state_dict())
    torch.testing.assert_close(again(means[n:]), out)
    with pytest.raises(VolumeVLMError, match="expected"):
        head(means[n:, :2])
    with pytest.raises(VolumeVLMError, match="unknown"):
        AnatomyHead.from_head_config({**head.head_config(), "extra": 1})


def test_cached_labels_equal_the_heads_and_are_read_back_without_running_it(tmp_path):
    from volumevlm.models.anatomy import cached_organ_labels

    torch.manual_seed(0)
    net = _net().eval()
    images = torch.rand(3, 1, 16, 16, 16)
    first = cached_organ_labels(net, images, tmp_path)
    torch.testing.assert_close(first, organ_labels(net, images))
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.npz"))) == 3
    assert not list(folders[0].glob("*.tmp"))  # written atomically

    class Poisoned(torch.nn.Module):
        """The same weights (so the same cache folder) but a forward that must not run."""

        def __init__(self, net):
            super().__init__()
            self.inner, self.config, self._organ_fingerprint = net, net.config, net._organ_fingerprint

        def forward(self, x):
            raise AssertionError("the cached labels should have been read")

    again = cached_organ_labels(Poisoned(net), images[[2, 0]], tmp_path)
    assert torch.equal(again, first[[2, 0]])
    # A damaged entry is recomputed; other weights find other organs, in another folder.
    damaged = sorted(folders[0].glob("*.npz"))[0]
    damaged.write_bytes(b"not an npz")
    torch.testing.assert_close(cached_organ_labels(net, images, tmp_path), first)
    other = _net().eval()
    cached_organ_labels(other, images, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


class _TinyVLM(torch.nn.Module):
    """What zero-shot needs of a VolumeVLM: a text encoder (fixed random unit rows per
    text), a logit scale and a device."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.rows: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(1)

    @property
    def device(self):
        return self.anchor.device

    def scale(self):
        return torch.tensor(50.0)

    def encode_text(self, texts):
        for t in texts:
            if t not in self.rows:
                self.rows[t] = torch.nn.functional.normalize(torch.randn(8, generator=self.generator), dim=0)
        return torch.stack([self.rows[t] for t in texts])


def test_zero_shot_reads_each_finding_in_its_section_and_the_rest_globally():
    from volumevlm.models.anatomy import AnatomyHead
    from volumevlm.models.zero_shot import zero_shot_from_sections
    from volumevlm.text.prompts import load_prompt_set, zero_shot_probabilities

    model, prompts = _TinyVLM(), load_prompt_set("synthetic")
    head = AnatomyHead(["SPLEEN", "PERITONEUM"], {"splenomegaly": "SPLEEN", "ascites": "PERITONEUM"},
                       organ_classes=3, feature_dim=4, embed_dim=8)
    generator = torch.Generator().manual_seed(2)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    sections = torch.nn.functional.normalize(torch.randn(5, 2, 8, generator=generator), dim=-1)
    findings = ["ascites", "cardiomegaly", "splenomegaly"]
    probs, names, read_in = zero_shot_from_sections(model, image, sections, head, prompts, findings)
    assert names == findings and read_in == ["PERITONEUM", None, "SPLEEN"]

    def direct(emb, key):
        return zero_shot_probabilities(emb, model.encode_text, prompts, [key], logit_scale=model.scale())[:, 0]

    torch.testing.assert_close(probs[:, 0], direct(sections[:, 1], "ascites"))
    torch.testing.assert_close(probs[:, 1], direct(image, "cardiomegaly"))
    torch.testing.assert_close(probs[:, 2], direct(sections[:, 0], "splenomegaly"))
    with pytest.raises(VolumeVLMError, match="do not match"):
        zero_shot_from_sections(model, image, sections[:, :1], head, prompts, findings)


def test_the_fit_reads_the_text_tower_in_eval_mode_and_gives_the_callers_mode_back():
    from volumevlm.train.anatomy import fit_anatomy_head

    class NoisyInTraining(torch.nn.Module):
        """Text embeddings that are noise while in training mode (as dropout would make them)."""

        def __init__(self, table):
            super().__init__()
            self.table = table

        def encode_text(self, texts):
            rows = torch.stack([self.table[t] for t in texts])
            return rows + torch.randn_like(rows) if self.training else rows

    generator = torch.Generator().manual_seed(3)
    means = torch.randn(60, 2, 3, generator=generator)
    texts = ["SPLEEN: Splenomegaly.", "SPLEEN: Unremarkable spleen."]
    table = {texts[0]: torch.tensor([1.0, 0.0]), texts[1]: torch.tensor([0.0, 1.0])}
    reports = [texts[int(m > 0)] for m in means[:, 0, 0]]
    tower = NoisyInTraining(table)
    expected, _ = fit_anatomy_head(tower.eval(), means, reports, ["splenomegaly"], organ_classes=3, sections=["SPLEEN"])
    got, _ = fit_anatomy_head(tower.train(), means, reports, ["splenomegaly"], organ_classes=3, sections=["SPLEEN"])
    assert tower.training
    torch.testing.assert_close(got.weight, expected.weight)


def test_folded_linear_acts_on_raw_features_as_the_fit_on_standardized_ones():
    from sklearn.preprocessing import StandardScaler

    from volumevlm.train.anatomy import folded_linear

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 4))
    x[:, 2] = 7.0  # a constant feature: scale 0, left unscaled
    scaler = StandardScaler().fit(x)
    coef, intercept = rng.normal(size=(2, 4)), rng.normal(size=2)
    weight, bias = folded_linear(scaler, coef, intercept)
    np.testing.assert_allclose(x @ weight.T + bias, scaler.transform(x) @ coef.T + intercept, atol=1e-10)


def test_phenotype_classifiers_are_scikit_learns_logistic_fits_on_the_organ_features():
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from volumevlm.models.anatomy import AnatomyHead
    from volumevlm.models.probes import PROBE_CS, PROBE_FOLDS
    from volumevlm.train.anatomy import MIN_CODE_CASES, fit_anatomy_head

    generator = torch.Generator().manual_seed(4)
    n, organs, channels = 150, 3, 4
    features = torch.randn(n + 50, organs, channels, generator=generator)
    enlarged = features[:, 1, 0] > 0.3       # the spleen's code, 289.4, follows organ 2
    rare = torch.zeros(n + 50, dtype=torch.bool)
    rare[: MIN_CODE_CASES - 1] = True      # too few positives to fit: left out
    codes = torch.stack([enlarged, rare], dim=1).double().numpy()
    texts = {True: "SPLEEN: Splenomegaly.", False: "SPLEEN: Unremarkable spleen."}
    table = {texts[True]: torch.tensor([1.0, 0.0]), texts[False]: torch.tensor([0.0, 1.0])}
    reports = [texts[bool(e)] for e in enlarged[:n]]
    head, info = fit_anatomy_head(_TextTable(table), features[:n], reports, ["splenomegaly"], organ_classes=organs + 1,
                                  sections=["SPLEEN"], phecodes=["289.4", "999"], codes=codes[:n], seed=0)
    assert head.phecodes == ("289.4",) and set(info["phenotypes"]) == {"289.4"}
    x = features.flatten(1).double().numpy()
    scaler = StandardScaler().fit(x[:n])
    expected = LogisticRegressionCV(Cs=list(PROBE_CS), scoring="roc_auc", max_iter=2000,
                                    cv=StratifiedKFold(PROBE_FOLDS, shuffle=True, random_state=0)
                                    ).fit(scaler.transform(x[:n]), codes[:n, 0] > 0.5)
    logits = head.phenotype_logits(features[n:])
    assert logits.shape == (50, 1)
    np.testing.assert_allclose(logits[:, 0].numpy(), expected.decision_function(scaler.transform(x[n:])),
                               atol=1e-3, rtol=1e-3)
    assert info["phenotypes"]["289.4"] == {"positives": int(enlarged[:n].sum()), "C": float(expected.C_[0])}
    # It reads held-out cases.
    assert ((logits[:, 0] > 0) == enlarged[n:]).float().mean() >= 0.9
    # Round trip; a head fitted (or saved) without codes has no classifier and says how to get one.
    again = AnatomyHead.from_head_config(head.head_config())
    again.load_state_dict(head.state_dict())
    torch.testing.assert_close(again.phenotype_logits(features[n:]), logits)
    config = {k: v for k, v in head.head_config().items() if k not in ("phecodes", "organ_statistics")}
    older = AnatomyHead.from_head_config(config)
    assert head.organ_statistics == "hu_fine_dilated" and older.organ_statistics == "hu16"  # saved before the setting
    older.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("phenotype")})
    with pytest.raises(VolumeVLMError, match="fitted without phecodes.*experiment=report_demo"):
        older.phenotype_logits(features[n:])
    with pytest.raises(VolumeVLMError, match="codes"):
        fit_anatomy_head(_TextTable(table), features[:n], reports, ["splenomegaly"], organ_classes=organs + 1,
                         sections=["SPLEEN"], phecodes=["289.4"], codes=codes[:n])


def test_phenotypes_read_through_the_findings_classifier_when_given_one():
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from volumevlm.models.anatomy import AnatomyHead
    from volumevlm.models.probes import PROBE_CS, PROBE_FOLDS
    from volumevlm.train.anatomy import fit_anatomy_head

    rng = np.random.default_rng(5)
    n, organs, channels = 150, 3, 4
    features = torch.from_numpy(rng.normal(size=(n + 50, organs, channels))).float()
    x = features.flatten(1).double().numpy()
    # A findings classifier on the organ features: splenomegaly follows organ 2's first channel.
    weight = np.zeros((2, organs * channels))
    weight[0, channels] = 3.0
    weight[1] = rng.normal(size=organs * channels)
    bias = np.array([-1.0, 0.5])
    probabilities = 1.0 / (1.0 + np.exp(-(x @ weight.T + bias)))
    out_of_fold = np.clip(probabilities[:n] + rng.normal(scale=0.05, size=(n, 2)), 0.0, 1.0)  # as if held out
    enlarged = probabilities[:, 0] > 0.5
    codes = enlarged[:, None].astype(float)
    texts = {True: "SPLEEN: Splenomegaly.", False: "SPLEEN: Unremarkable spleen."}
    table = {texts[True]: torch.tensor([1.0, 0.0]), texts[False]: torch.tensor([0.0, 1.0])}
    reports = [texts[bool(e)] for e in enlarged[:n]]
    probe = {"findings": ["splenomegaly", "ascites"], "weight": weight, "bias": bias, "out_of_fold": out_of_fold}
    head, info = fit_anatomy_head(_TextTable(table), features[:n], reports, ["splenomegaly"], organ_classes=organs + 1,
                                  sections=["SPLEEN"], phecodes=["289.4"], codes=codes[:n], seed=0, findings_probe=probe)
    assert head.phenotype_findings == ("splenomegaly", "ascites") and info["phenotypes_through"] == ["splenomegaly", "ascites"]
    assert head.phenotype_weight.shape == (1, 2)
    # The code's regression is scikit-learn's on the out-of-fold probabilities, applied to
    # the classifier's probabilities of new cases.
    scaler = StandardScaler().fit(out_of_fold)
    expected = LogisticRegressionCV(Cs=list(PROBE_CS), scoring="roc_auc", max_iter=2000,
                                    cv=StratifiedKFold(PROBE_FOLDS, shuffle=True, random_state=0)
                                    ).fit(scaler.transform(out_of_fold), codes[:n, 0] > 0.5)
    logits = head.phenotype_logits(features[n:])
    np.testing.assert_allclose(logits[:, 0].numpy(), expected.decision_function(scaler.transform(probabilities[n:])),
                               atol=1e-3, rtol=1e-3)
    assert ((logits[:, 0] > 0).numpy() == enlarged[n:]).mean() >= 0.9
    # Saved and loaded; a head saved before the setting reads the codes from the organ features.
    again = AnatomyHead.from_head_config(head.head_config())
    again.load_state_dict(head.state_dict())
    torch.testing.assert_close(again.phenotype_logits(features[n:]), logits)
    older = {k: v for k, v in head.head_config().items() if k != "phenotype_findings"}
    assert AnatomyHead.from_head_config(older).phenotype_weight.shape == (1, organs * channels)
    with pytest.raises(VolumeVLMError, match="findings classifier weight"):
        fit_anatomy_head(_TextTable(table), features[:n], reports, ["splenomegaly"], organ_classes=organs + 1,
                         sections=["SPLEEN"], phecodes=["289.4"], codes=codes[:n],
                         findings_probe={**probe, "out_of_fold": out_of_fold[:-1]})
    with pytest.raises(VolumeVLMError, match="phenotype_findings without phecodes"):
        AnatomyHead(["SPLEEN"], {}, organs + 1, channels, 2, phenotype_findings=["splenomegaly"])


def test_section_texts_and_retrieval_vectors_by_hand():
    from volumevlm.models.anatomy import anatomy_retrieval_vectors, section_texts

    report = "FINDINGS:\nLIVER AND BILIARY TREE: Hepatomegaly.\nSPLEEN: Normal.\nIMPRESSION: Hepatomegaly."
    assert section_texts(report, ["SPLEEN", "KIDNEYS AND URETERS", "LIVER AND BILIARY TREE"]) == \
        ["SPLEEN: Normal.", None, "LIVER AND BILIARY TREE: Hepatomegaly."]
    torch.manual_seed(0)
    g_img, g_txt = torch.randn(3, 4), torch.randn(3, 4)
    s_img, s_txt = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    s_txt[1, 0] = 0  # a report without its first section
    a, b = anatomy_retrieval_vectors(g_img, s_img), anatomy_retrieval_vectors(g_txt, s_txt)
    assert a.shape == (3, 12) and torch.allclose(a.norm(dim=1), torch.ones(3))
    cos = torch.nn.functional.cosine_similarity
    for i in range(3):
        for j in range(3):
            sections = [cos(s_img[i, s], s_txt[j, s], dim=0) if s_txt[j, s].any() else torch.tensor(0.0) for s in range(2)]
            expected = (cos(g_img[i], g_txt[j], dim=0) + torch.stack(sections).mean()) / 2
            assert torch.allclose(a[i] @ b[j], expected, atol=1e-6)
    with pytest.raises(VolumeVLMError, match="do not match") as err:
        anatomy_retrieval_vectors(g_img, s_img[:, :, :3])
    assert "\n" not in str(err.value)
