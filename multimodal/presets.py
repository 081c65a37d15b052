"""``ModelConfig``: the composed configuration of the report model, and its preset registry.

Presets (one registry, ``PRESETS``):

* ``tiny``: CI. Narrow ResNet-50 layout (bottleneck widths 8-16-32-64), 64x64 slabs, tiny decoder;
  a forward and backward take well under a second once warm.
* ``demo``: trainable on a 2-core CPU within an hour: ResNet-50 depth/bottlenecks narrowed to
  16-32-64-128 (512 output channels), 16 slabs of 128x128, decoder ``demo``.
* ``full``: standard ResNet-50 width (2048 channels) for image and audio, 64 slabs of 256x256,
  decoder ``full`` (GPU).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from core.decoder import DecoderConfig
from multimodal.audio_encoder import AudioEncoderConfig
from multimodal.fusion import FusionConfig
from multimodal.heads import HeadsConfig
from multimodal.image_encoder import ImageEncoderConfig

DEFAULT_VOCAB_SIZE = 8000


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(vocab_size=DEFAULT_VOCAB_SIZE))
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    lm_weight: float = 1.0
    heads_weight: float = 1.0
    aux_weight: float = 0.01
    # Supervised copy loss (core.decoder.copy_loss: the gate and the pointer, aligned by shared
    # trigrams of report and digest); needs decoder.copy and a history digest. 0 = off.
    copy_weight: float = 0.0
    # Length of the n-grams the copy supervision aligns (core.decoder.copy_targets): 3 since
    # session 5. With 3, the tokens of a two-word fact ("colon cancer" in "known colon cancer.",
    # where the record has "colon cancer,") get a copy label in 43 % of training reports; with 2,
    # in 69 % (and a prior nodule's "6 mm" in 32 % instead of 0 %). 2 also labels more common
    # bigrams as copies.
    copy_ngram: int = 3
    # Weight of the next-token loss on the report tokens that state a planted history fact (the
    # manifest's ``facts[].expect_in_report`` phrases, e.g. "without intravenous contrast",
    # "known colon cancer"; app.train_data.fact_spans). These are few tokens per report and rare
    # across reports, so at a plain weight of 1 a CPU-trained decoder writes the common variant
    # ("with IV contrast") instead. Training only; data without facts is unaffected. 1 = off.
    fact_weight: float = 1.0
    # Weight of the next-token loss on the report sentences (findings and impression) that state a
    # finding the study has (app.train_data.finding_sentence_spans: the labeller reads each
    # sentence). Session 13's decoder wrote "The heart is normal in size." under "Calls:
    # cardiomegaly" in 41 of 41 test reports: teacher-forced on training studies it gave the
    # heart line's "Cardiomegaly" 0.001, less than its share of all heart lines. These sentences
    # are the few tokens that depend on the calls; the rest of a report is the normal template.
    # Training only. 1 = off. The demo recipe uses 3 since session 25: retrained with it, the
    # decoder wrote 58 % of the test studies' present findings in their own organ-system line
    # (43 % without), at the same BLEU-4.
    finding_weight: float = 1.0
    name: str = "custom"
    # Inputs the model reads. False makes a model blind to that modality everywhere (training,
    # generation, the UI): the image-blind baseline is use_image=False, use_audio=False.
    use_image: bool = True
    use_audio: bool = True
    # History digest (data.history_digest): the record's relevant sentences, at most this many
    # words, appended to the history prefix right before [REPORT] and used as the decoder's copy
    # sources (decoder.copy). 0 = off.
    history_digest_words: int = 0
    # Finding prompt (data.finding_prompt): the finding calls as a line of text between the
    # history and [REPORT] ("Calls: cardiomegaly; right lower lobe nodule."), from the heads at
    # inference and from the labels in training; a copy source with the digest. False = off.
    finding_prompt: bool = False
    # The calls grouped under the Findings' organ-system headings, every system named ("Calls:
    # Lungs and airways: right lower lobe nodule. Pleura: none. ..."; data.finding_prompt), so that
    # each Findings line has its own calls under the heading it starts with. False: one list.
    # Session 24's demo decoder retrained with it: BLEU-4 0.197 against 0.207, facts 84 % against
    # 88 %, so the demo recipe keeps the one list.
    finding_prompt_by_system: bool = False
    # Acquisition line (data.finding_prompt.acquisition_phrase) before the calls: IV contrast or
    # not and the slice thickness, from the study's header in training and at inference
    # ("Acquisition: no IV contrast, 5 mm slices."), for the technique section. False = off.
    acquisition_prompt: bool = False
    # Whether that line states the slice thickness; False keeps the contrast only
    # (data.finding_prompt.without_thickness), for data with a single thickness.
    acquisition_thickness: bool = True
    # The nodule call carries its measured size ("right lower lobe nodule 12 mm"): from the labels in
    # training, from data.nodule_measure (a classical measurement on the CT, on the called side) at
    # inference; so that the report states today's size of a known nodule. False = off.
    nodule_size_prompt: bool = False
    # Training only: the share of nodule calls whose size is left out, as when the measurement
    # finds nothing at inference.
    nodule_size_dropout: float = 0.25
    # Training only: the share of examples whose prompt leaves the calls line out (the report is
    # then written from the record, the image context and the acquisition line alone), so that the
    # decoder does not learn to lean on the calls alone: session 10's model carried a known cancer
    # into 23 % of its reports, an image-blind decoder trained the same way into 71 %. 0 = off.
    finding_prompt_dropout: float = 0.0
    # Training only: the share of studies whose decoder cross-attends to the finding-context tokens
    # alone, its fused image / audio / history tokens masked out (needs heads.finding_context).
    # Session 15 found the decoder's organ-system lines blind to the calls (changing a study's
    # calls left them unchanged) and read from the fused tokens instead; here they are the only
    # way to the findings for this share of studies. 0 = off.
    context_dropout: float = 0.0

    @classmethod
    def preset(cls, name: str, vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = cls(
            image=ImageEncoderConfig.preset(name),
            audio=AudioEncoderConfig.preset(name),
            fusion=FusionConfig.preset(name),
            decoder=DecoderConfig.preset(name, vocab_size=vocab_size),
            heads=HeadsConfig(),
            name=name,
        )
        return dataclasses.replace(cfg, **overrides)

    @property
    def runs_detectors(self) -> bool:
        """Whether the model's inputs include the classical detectors' reading of the CT
        (data.detectors): the measured size in the nodule call (nodule_size_prompt with the
        finding prompt) or the detectors' evidence fused into the heads (heads.detector_evidence)."""
        return (self.nodule_size_prompt and self.finding_prompt) or bool(self.heads.detector_evidence)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decoder"] = self.decoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        def tup(v):  # JSON lists back to the config's (nested) tuples
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        def build(kind, sub: dict):
            names = {f.name for f in dataclasses.fields(kind)}
            kw = {k: tup(v) for k, v in sub.items() if k in names}
            return kind(**kw)

        return cls(
            image=build(ImageEncoderConfig, d.get("image", {})),
            audio=build(AudioEncoderConfig, d.get("audio", {})),
            fusion=build(FusionConfig, d.get("fusion", {})),
            decoder=_decoder_from_dict(d.get("decoder", {})),
            heads=build(HeadsConfig, d.get("heads", {})),
            **{k: d[k] for k in ("lm_weight", "heads_weight", "aux_weight", "copy_weight", "copy_ngram", "fact_weight", "finding_weight", "name", "use_image", "use_audio",
                                      "history_digest_words", "finding_prompt", "finding_prompt_by_system", "acquisition_prompt", "acquisition_thickness", "finding_prompt_dropout", "context_dropout",
                                      "nodule_size_prompt", "nodule_size_dropout") if k in d},
        )


def _decoder_from_dict(d: dict) -> DecoderConfig:
    d = dict(d)
    for sub in ("attention",):
        if isinstance(d.get(sub), dict):
            d[sub] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d[sub].items()}
    return DecoderConfig.from_dict(d)


PRESETS = ("tiny", "demo", "full")
