"""The latency guide as data: presets, model map, speed profiles, budget attribution."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from lk_observe import presets
from lk_observe.presets import (
    DEFAULT_BUDGET,
    GUIDE_BUDGET,
    GUIDE_TOTAL_MS,
    MODEL_LATENCY,
    SPEED_PROFILES,
    VAD_PRESETS,
    LatencyBudget,
    VADPreset,
    budget_overruns,
    expected_latency,
    model_latency,
)
from lk_observe.turns import (
    COMPONENTS,
    EXCELLENT_BELOW_MS,
    GOOD_BELOW_MS,
    STAGES,
    TIERS,
    Turn,
    tier_for,
)


def make_turn(**latency_ms: float) -> Turn:
    return Turn(
        index=1,
        speech_id="speech_1",
        started_at=1_700_000_000.0,
        ended_at=1_700_000_001.0,
        latency_ms=latency_ms,
        interrupted=False,
        tier=tier_for(latency_ms.get("e2e")),
    )


def test_the_guides_four_vad_presets_exist_with_an_intent() -> None:
    assert list(VAD_PRESETS) == ["fast_qa", "conversation", "noisy", "thoughtful"]
    for preset in VAD_PRESETS.values():
        assert preset.intent
        assert 0 < preset.activation_threshold < 1
        assert preset.min_endpointing_delay <= preset.max_endpointing_delay


def test_presets_trade_latency_for_patience_in_order() -> None:
    detection = [VAD_PRESETS[n].turn_detection_ms[0] for n in ("fast_qa", "conversation")]
    assert detection == sorted(detection)
    assert (
        VAD_PRESETS["thoughtful"].turn_detection_ms[0] > VAD_PRESETS["noisy"].turn_detection_ms[0]
    )
    # noise is rejected by a higher threshold and a longer minimum speech
    noisy, conversation = VAD_PRESETS["noisy"], VAD_PRESETS["conversation"]
    assert noisy.activation_threshold > conversation.activation_threshold
    assert noisy.min_speech_duration > conversation.min_speech_duration


def test_fast_qa_turn_detection_fits_the_guides_vad_budget() -> None:
    low, high = VAD_PRESETS["fast_qa"].turn_detection_ms
    assert (low, high) == DEFAULT_BUDGET.components["vad"]


def test_silero_kwargs_are_the_silero_load_parameters() -> None:
    kwargs = VAD_PRESETS["noisy"].silero_kwargs()
    assert kwargs == {
        "min_speech_duration": 0.2,
        "min_silence_duration": 0.4,
        "prefix_padding_duration": 0.4,
        "activation_threshold": 0.7,
    }
    assert VAD_PRESETS["noisy"].endpointing() == {"min_delay": 0.4, "max_delay": 3.0}


def test_preset_kwargs_are_accepted_by_livekits_bundled_silero_vad() -> None:
    from livekit.agents.inference import VAD

    for preset in VAD_PRESETS.values():
        vad = VAD(**preset.silero_kwargs())
        assert vad.min_silence_duration == preset.min_silence_duration


def test_presets_are_frozen_and_validated() -> None:
    preset = VAD_PRESETS["fast_qa"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.min_silence_duration = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        VAD_PRESETS["new"] = preset  # type: ignore[index]
    with pytest.raises(ValueError, match="activation_threshold"):
        dataclasses.replace(preset, activation_threshold=1.5)
    with pytest.raises(ValueError, match="max_endpointing_delay"):
        dataclasses.replace(preset, min_endpointing_delay=2.0, max_endpointing_delay=1.0)
    with pytest.raises(ValueError, match="min_silence_duration"):
        VADPreset("x", "", 0.1, math.nan, 0.1, 0.5, 0.1, 1.0)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="fast_qa, conversation, noisy, thoughtful"):
        presets.vad_preset("chatty")
    with pytest.raises(KeyError, match="ultra, fast, balanced"):
        presets.speed_profile("warp")


def test_model_map_names_the_guides_models_per_component() -> None:
    assert model_latency("deepgram/nova-3").component == "stt"
    assert model_latency("openai/gpt-4o-mini").component == "llm_ttft"
    assert model_latency("openai/gpt-4.1-mini").component == "llm_ttft"
    assert model_latency("groq/llama-3.1-8b-instant").component == "llm_ttft"
    assert model_latency("cartesia/sonic-2").component == "tts_ttfb"
    assert model_latency("elevenlabs/eleven_flash_v2_5").component == "tts_ttfb"
    for model in MODEL_LATENCY.values():
        low, high = model.typical_ms
        assert 0 < low <= high
        assert model.provider and model.model


def test_models_are_found_by_bare_name_and_case_insensitively() -> None:
    assert model_latency("nova-3", "stt").name == "deepgram/nova-3"
    assert model_latency("OpenAI/GPT-4.1-mini").name == "openai/gpt-4.1-mini"


def test_unknown_model_error_lists_known_models_of_that_kind() -> None:
    with pytest.raises(KeyError) as info:
        expected_latency("deepgram/nova-3", "openai/gpt-9", "cartesia/sonic-2")
    message = str(info.value)
    assert "unknown LLM model 'openai/gpt-9'" in message
    assert "openai/gpt-4.1-mini" in message and "groq/llama-3.1-8b-instant" in message
    assert "deepgram/nova-3" not in message  # only LLMs are listed for an LLM slot


def test_a_model_in_the_wrong_slot_is_unknown_there() -> None:
    with pytest.raises(KeyError, match="unknown STT model 'cartesia/sonic-2'"):
        expected_latency("cartesia/sonic-2", "openai/gpt-4o-mini", "cartesia/sonic-2")


def test_expected_latency_sums_components_into_the_total() -> None:
    ranges = expected_latency("deepgram/nova-3", "groq/llama-3.1-8b-instant", "cartesia/sonic-2")
    assert ranges == {
        "network": (50.0, 100.0),
        "vad": (150.0, 200.0),
        "stt": (150.0, 200.0),
        "llm_ttft": (100.0, 200.0),
        "tts_ttfb": (40.0, 80.0),
        "total": (490.0, 780.0),
    }


def test_expected_latency_with_a_vad_preset_uses_its_detection_time() -> None:
    ranges = expected_latency(
        "deepgram/nova-3", "openai/gpt-4.1-mini", "cartesia/sonic-2", vad="thoughtful"
    )
    assert ranges["vad"] == VAD_PRESETS["thoughtful"].turn_detection_ms
    components = [v for k, v in ranges.items() if k != "total"]
    assert ranges["total"] == (sum(r[0] for r in components), sum(r[1] for r in components))


def test_the_guides_budget_adds_up_to_its_total() -> None:
    assert DEFAULT_BUDGET.components == {
        "network": (50.0, 100.0),
        "vad": (150.0, 200.0),
        "stt": (150.0, 200.0),
        "llm_ttft": (200.0, 300.0),
        "tts_ttfb": (40.0, 80.0),
    }
    assert DEFAULT_BUDGET.total == (600.0, 900.0)
    lows = sum(r[0] for r in DEFAULT_BUDGET.components.values())
    highs = sum(r[1] for r in DEFAULT_BUDGET.components.values())
    assert abs(lows - 600) <= 10 and abs(highs - 900) <= 20  # the guide rounds its total


def test_default_budget_is_the_guides_one_table() -> None:
    assert dict(DEFAULT_BUDGET.components) == {
        line.component: line.range_ms for line in GUIDE_BUDGET
    }
    assert DEFAULT_BUDGET.total == GUIDE_TOTAL_MS
    assert [line.title for line in GUIDE_BUDGET] == [
        "network (WebRTC)",
        "VAD/turn detection",
        "STT",
        "LLM TTFT",
        "TTS TTFB",
    ]
    # every line but network bounds a stage a turn measures; eou deliberately has no line
    lines = [line.component for line in GUIDE_BUDGET]
    assert len(set(lines)) == len(lines)
    assert set(lines) - set(STAGES) == {"network"}
    # eou and the agent's leading silence are measured but the guide has no line for them
    assert set(STAGES) - set(lines) == {"eou", "leading_silence"}


def test_the_guides_tiers_are_the_turns_tiers() -> None:
    assert tuple(c for c in COMPONENTS if c != "e2e") == STAGES
    assert (EXCELLENT_BELOW_MS, GOOD_BELOW_MS) == (500.0, 800.0)
    below = [EXCELLENT_BELOW_MS - 0.1, GOOD_BELOW_MS - 0.1, GOOD_BELOW_MS]
    assert tuple(tier_for(ms) for ms in below) == TIERS == ("excellent", "good", "slow")


def test_speed_profiles_get_slower_and_name_known_models() -> None:
    assert list(SPEED_PROFILES) == ["ultra", "fast", "balanced"]
    totals = [p.expected_latency()["total"] for p in SPEED_PROFILES.values()]
    assert totals == sorted(totals)
    for profile in SPEED_PROFILES.values():
        assert profile.vad_preset in VAD_PRESETS
        assert profile.intent
    assert SPEED_PROFILES["ultra"].expected_latency()["total"][1] < DEFAULT_BUDGET.total[1]


def test_budget_overruns_reports_only_components_over_their_upper_bound() -> None:
    turn = make_turn(e2e=1012.5, vad=180.0, stt=260.0, eou=640.0, llm_ttft=450.0, tts_ttfb=80.0)
    assert budget_overruns(turn) == {"e2e": 112.5, "stt": 60.0, "llm_ttft": 150.0}


def test_a_fast_turn_has_no_overruns() -> None:
    assert budget_overruns(make_turn(e2e=480.0, stt=120.0, llm_ttft=210.0)) == {}


def test_components_without_a_budget_or_a_number_are_never_guessed() -> None:
    turn = make_turn(eou=5000.0, llm_ttft=math.nan, e2e=math.inf)
    assert budget_overruns(turn) == {}


def test_a_custom_budget_changes_the_attribution() -> None:
    strict = LatencyBudget(components={"eou": (0.0, 300.0)}, total=(0.0, 500.0))
    turn = make_turn(e2e=600.0, eou=350.0, stt=900.0)
    assert budget_overruns(turn, strict) == {"e2e": 100.0, "eou": 50.0}


def test_a_budget_is_immune_to_its_callers_dict() -> None:
    components = {"stt": (100.0, 200.0)}
    budget = LatencyBudget(components=components, total=(0.0, 900.0))
    components["stt"] = (0.0, 1.0)
    assert budget.components["stt"] == (100.0, 200.0)
    with pytest.raises(ValueError, match="stt"):
        LatencyBudget(components={"stt": (300.0, 200.0)}, total=(0.0, 1.0))


def test_the_budget_runbook_shows_the_guides_table() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "runbooks" / "latency-budget.md"
    cells = [row.split(" | ") for row in doc.read_text().splitlines() if row.startswith("| ")]
    expected = {row[0].removeprefix("| "): row[1] for row in cells}
    titled = {line.title: line.range_ms for line in GUIDE_BUDGET} | {"total": GUIDE_TOTAL_MS}
    for title, (low, high) in titled.items():
        (row,) = [name for name in expected if name.startswith(title)]
        assert expected[row] == f"{low:.0f}-{high:.0f} ms", row


def test_the_configuration_doc_shows_the_data_as_it_is() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for p in VAD_PRESETS.values():
        low, high = p.turn_detection_ms
        row = (
            f"| `{p.name}` | {p.min_speech_duration} s | {p.min_silence_duration} s | "
            f"{p.prefix_padding_duration} s | {p.activation_threshold} | "
            f"{p.min_endpointing_delay} / {p.max_endpointing_delay} s | {low:.0f}-{high:.0f} ms |"
        )
        assert row in doc, row
    for m in MODEL_LATENCY.values():
        low, high = m.typical_ms
        row = f"| `{m.name}` | `{m.component}` | {low:.0f}-{high:.0f} ms | {m.note} |"
        assert row in doc, row
    for s in SPEED_PROFILES.values():
        low, high = s.expected_latency()["total"]
        row = (
            f"| `{s.name}` | `{s.stt}` | `{s.llm}` | `{s.tts}` | `{s.vad_preset}` | "
            f"{low:.0f}-{high:.0f} ms |"
        )
        assert row in doc, row
