"""transformers' common test mixins (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`) applied to a
Swin V2 family: swinv2_fast's classes, or transformers' own ones with the same testers.

Not collected by the normal run (the name does not start with test_): tests/test_peer_suites.py runs this
file in a child pytest, once per side, and compares the outcomes. The environment chooses the side:

    SWINV2_PEER_SIDE=ours          swinv2_fast.Swinv2{Model,ForImageClassification,ForMaskedImageModeling,
                                   Backbone} with swinv2_fast.Swinv2Config (the default)
    SWINV2_PEER_SIDE=transformers  transformers.Swinv2* with transformers.Swinv2Config
    SWINV2_PEER_TESTS=DIR          the `tests/` folder of transformers' sdist (tests/_peers.peer_tests);
                                   fetched here when unset

The testers describe the family the way transformers' own Swinv2 tests do (small model, four classes, the
tests Swin's layout needs written for it: attentions per stage, hidden states per stage plus the NCHW copies,
padding to the patch size, initialisation), written here from the mixins' contracts. Everything else comes
from the mixins unchanged. On CPU our models take the eager window-attention path.
"""

import collections.abc
import inspect
import os
import unittest
from pathlib import Path

import torch
from torch import nn

import _peers

SIDE = os.environ.get("SWINV2_PEER_SIDE", "ours")
if SIDE not in ("ours", "transformers"):
    raise ValueError(f"SWINV2_PEER_SIDE must be 'ours' or 'transformers', got {SIDE!r}")

_tests_dir = os.environ.get("SWINV2_PEER_TESTS")
modeling_common, configuration_common, backbone_common = _peers.import_transformers_mixins(
    Path(_tests_dir) if _tests_dir else _peers.peer_tests("transformers")
)
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
BackboneTesterMixin = backbone_common.BackboneTesterMixin
floats_tensor, ids_tensor = modeling_common.floats_tensor, modeling_common.ids_tensor
_config_zero_init = modeling_common._config_zero_init

if SIDE == "ours":
    import swinv2_fast as family
else:
    import transformers as family

Swinv2Config = family.Swinv2Config
Swinv2Model = family.Swinv2Model
Swinv2ForImageClassification = family.Swinv2ForImageClassification
Swinv2ForMaskedImageModeling = family.Swinv2ForMaskedImageModeling
Swinv2Backbone = family.Swinv2Backbone
DEVICE = "cpu"


def _as_pair(value):
    return tuple(value) if isinstance(value, collections.abc.Iterable) else (value, value)


class FamilyTester:
    """Config and inputs of a small Swin V2: 32x32 images in patches of 2 (a 16x16 grid), two stages of two
    blocks with windows of 2, so that every stage shifts (its second block), pads nothing and merges patches.
    Two stages: the mixin's test_num_layers_is_small holds testers to num_hidden_layers <= 2."""

    def __init__(
        self,
        parent,
        batch_size=4,
        image_size=32,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=2,
        mlp_ratio=2.0,
        drop_path_rate=0.1,
        num_labels=10,
        encoder_stride=4,
        out_features=("stage1", "stage2"),
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.drop_path_rate = drop_path_rate
        self.num_labels = num_labels
        self.encoder_stride = encoder_stride  # the decoder's pixel shuffle: patch 2 * 2**(stages - 1)
        self.out_features = list(out_features)
        self.is_training = True
        # what the mixins read off the tester
        self.num_hidden_layers = len(self.depths)
        self.num_attention_heads = self.num_heads[0]
        self.hidden_size = embed_dim
        self.seq_length = (image_size // patch_size) ** 2

    def get_config(self):
        return Swinv2Config(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            embed_dim=self.embed_dim,
            depths=self.depths,
            num_heads=self.num_heads,
            window_size=self.window_size,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            drop_path_rate=self.drop_path_rate,
            hidden_act="gelu",
            use_absolute_embeddings=False,
            layer_norm_eps=1e-5,
            initializer_range=0.02,
            encoder_stride=self.encoder_stride,
            out_features=self.out_features,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    # ------------------------------------------------------------------- per-class checks
    def check_model(self, config, pixel_values, labels):
        model = Swinv2Model(config).to(DEVICE).eval()
        result = model(pixel_values)
        tokens = (self.image_size // self.patch_size) ** 2 // 4 ** (len(self.depths) - 1)
        channels = self.embed_dim * 2 ** (len(self.depths) - 1)
        self.parent.assertEqual(tuple(result.last_hidden_state.shape), (self.batch_size, tokens, channels))
        self.parent.assertEqual(tuple(result.pooler_output.shape), (self.batch_size, channels))

    def check_backbone(self, config, pixel_values, labels):
        model = Swinv2Backbone(config).to(DEVICE).eval()
        result = model(pixel_values)
        grid = self.image_size // self.patch_size
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        self.parent.assertEqual(list(result.feature_maps[0].shape), [self.batch_size, model.channels[0], grid, grid])
        self.parent.assertEqual(len(model.channels), len(config.out_features))
        config.out_features = None
        model = Swinv2Backbone(config).to(DEVICE).eval()
        result = model(pixel_values)
        last = grid // 2 ** (len(self.depths) - 1)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertEqual(list(result.feature_maps[0].shape), [self.batch_size, model.channels[-1], last, last])

    def check_masked_image_modeling(self, config, pixel_values, labels):
        model = Swinv2ForMaskedImageModeling(config).to(DEVICE).eval()
        result = model(pixel_values)
        shape = (self.batch_size, self.num_channels, self.image_size, self.image_size)
        self.parent.assertEqual(tuple(result.reconstruction.shape), shape)
        config.num_channels = 1  # greyscale
        model = Swinv2ForMaskedImageModeling(config).to(DEVICE).eval()
        result = model(floats_tensor([self.batch_size, 1, self.image_size, self.image_size]))
        self.parent.assertEqual(tuple(result.reconstruction.shape), (self.batch_size, 1) + shape[2:])

    def check_image_classification(self, config, pixel_values, labels):
        config.num_labels = self.num_labels
        model = Swinv2ForImageClassification(config).to(DEVICE).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(tuple(result.logits.shape), (self.batch_size, self.num_labels))
        self.parent.assertEqual(result.loss.dim(), 0)


class Swinv2FamilyModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Swinv2Model, Swinv2ForImageClassification, Swinv2ForMaskedImageModeling, Swinv2Backbone)
    test_resize_embeddings = False  # no token embeddings

    def setUp(self):
        self.model_tester = FamilyTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=Swinv2Config,
            embed_dim=37,
            has_text_modality=False,
            common_properties=["image_size", "patch_size", "num_channels"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.check_model(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_for_masked_image_modeling(self):
        self.model_tester.check_masked_image_modeling(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.check_image_classification(*self.model_tester.prepare_config_and_inputs())

    @unittest.skip(reason="a vision model: pixel_values, no inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Swin V2 has no feed-forward chunking (chunk_size_feed_forward is not read)")
    def test_feed_forward_chunking(self):
        pass

    def test_model_get_set_embeddings(self):
        # the mixin's version expects token embeddings; a patch embedding has no set_input_embeddings
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, nn.Linear))

    def test_forward_signature(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            names = list(inspect.signature(model_class(config).forward).parameters)
            self.assertEqual(names[:1], ["pixel_values"])

    def test_attention_outputs(self):
        # one attention tensor per stage (the stage's last block), (batch * windows, heads, N, N)
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        stages = len(self.model_tester.depths)
        n = config.window_size**2
        for model_class in self.all_model_classes:
            config.return_dict = True
            inputs = dict(inputs_dict, output_attentions=True, output_hidden_states=False)
            model = model_class._from_config(config, attn_implementation="eager").to(DEVICE).eval()
            config = model.config
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs, model_class))
            self.assertEqual(len(outputs.attentions), stages)

            # the same through config.output_attentions
            config.output_attentions = True
            model = model_class(config).to(DEVICE).eval()
            inputs = dict(inputs_dict, output_hidden_states=False)
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs, model_class))
            self.assertEqual(len(outputs.attentions), stages)
            self.assertEqual(list(outputs.attentions[0].shape[-3:]), [self.model_tester.num_heads[0], n, n])
            fields_without_states = len(outputs)

            # attentions come last; hidden states add one field (two with the NCHW copies)
            inputs = dict(inputs_dict, output_attentions=True, output_hidden_states=True)
            model = model_class(config).to(DEVICE).eval()
            with torch.no_grad():
                outputs = model(**self._prepare_for_class(inputs, model_class))
            added = 1 if model_class is Swinv2Backbone else 2
            self.assertEqual(len(outputs), fields_without_states + added)
            self.assertEqual(len(outputs.attentions), stages)
            self.assertEqual(list(outputs.attentions[0].shape[-3:]), [self.model_tester.num_heads[0], n, n])

    def _check_hidden_states(self, inputs_dict, config, model_class, image_size):
        model = model_class(config).to(DEVICE).eval()
        with torch.no_grad():
            outputs = model(**self._prepare_for_class(inputs_dict, model_class))
        stages = len(self.model_tester.depths) + 1
        self.assertEqual(len(outputs.hidden_states), stages)
        patch = _as_pair(config.patch_size)
        patches = (image_size[0] // patch[0]) * (image_size[1] // patch[1])
        self.assertEqual(list(outputs.hidden_states[0].shape[-2:]), [patches, self.model_tester.embed_dim])
        if model_class is not Swinv2Backbone:
            reshaped = outputs.reshaped_hidden_states
            self.assertEqual(len(reshaped), stages)
            _batch, channels, height, width = reshaped[0].shape
            self.assertEqual([height * width, channels], [patches, self.model_tester.embed_dim])

    def test_hidden_states_output(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        image_size = _as_pair(self.model_tester.image_size)
        for model_class in self.all_model_classes:
            self._check_hidden_states(dict(inputs_dict, output_hidden_states=True), config, model_class, image_size)
            config.output_hidden_states = True  # the same through the config
            self._check_hidden_states(dict(inputs_dict), config, model_class, image_size)
            config.output_hidden_states = False

    def test_hidden_states_output_with_padding(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config.patch_size = 3  # 32 is padded to 33
        size = _as_pair(self.model_tester.image_size)
        padded = tuple(s + 3 - s % 3 for s in size)
        for model_class in self.all_model_classes:
            self._check_hidden_states(dict(inputs_dict, output_hidden_states=True), config, model_class, padded)
            config.output_hidden_states = True
            self._check_hidden_states(dict(inputs_dict), config, model_class, padded)
            config.output_hidden_states = False

    def test_initialization(self):
        # with the init ranges at ~0, every weight is 0 and every norm weight 1 (embeddings and the logit scale
        # have their own values)
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        no_init = _config_zero_init(config)
        for model_class in self.all_model_classes:
            model = model_class(config=no_init)
            for name, param in model.named_parameters():
                if "embeddings" in name or "logit_scale" in name or not param.requires_grad:
                    continue
                self.assertIn(
                    ((param.data.mean() * 1e9).round() / 1e9).item(),
                    [0.0, 1.0],
                    msg=f"{model_class.__name__}: {name} is not initialised as transformers does",
                )


class Swinv2FamilyBackboneTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (Swinv2Backbone,)
    config_class = Swinv2Config

    def setUp(self):
        self.model_tester = FamilyTester(self)
