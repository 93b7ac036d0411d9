"""Configuration: every option is checked when the layer is built, with an error naming the
option, the value and what is accepted; and the Django system check (asgi_ipc.checks) reports the
same problems from ``manage.py check``, run here as a real subprocess on a settings module."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil

import pytest

from asgi_ipc import IPCChannelLayer
from asgi_ipc.layer import config_problems

from .helpers import MiB, django_check, shm_path, write_object

EXPIRY_RANGE = "from 0.001 to 10**12"
CAPACITY_RANGE = "from 1 to 2**63 - 1"
MEMORY_RANGE = "from 65536 (64 KiB) to 2**40 (1 TiB)"

# (option, value, what the message must say is accepted)
BAD_VALUES = [
    ("expiry", math.nan, EXPIRY_RANGE),
    ("expiry", math.inf, EXPIRY_RANGE),
    ("expiry", -math.inf, EXPIRY_RANGE),
    ("expiry", 1e300, EXPIRY_RANGE),
    ("expiry", 10**12 + 1, EXPIRY_RANGE),
    ("expiry", 0.0001, EXPIRY_RANGE),
    ("expiry", "60", EXPIRY_RANGE),
    ("expiry", True, EXPIRY_RANGE),
    ("group_expiry", math.nan, EXPIRY_RANGE),
    ("group_expiry", math.inf, EXPIRY_RANGE),
    ("group_expiry", 1e300, EXPIRY_RANGE),
    ("group_expiry", 0, EXPIRY_RANGE),
    ("capacity", 0, CAPACITY_RANGE),
    ("capacity", 2**63, CAPACITY_RANGE),
    ("capacity", 1.5, CAPACITY_RANGE),
    ("capacity", True, CAPACITY_RANGE),
    ("channel_memory", 1000, MEMORY_RANGE),
    ("channel_memory", 2**40 + 1, MEMORY_RANGE),
    ("channel_memory", 1.5 * MiB, MEMORY_RANGE),
    ("group_memory", "big", MEMORY_RANGE),
    ("group_memory", 2**41, MEMORY_RANGE),
    ("channel_capacity", {"a*": 0}, CAPACITY_RANGE),
    ("channel_capacity", {"a*": "10"}, CAPACITY_RANGE),
    ("channel_capacity", {"a*": 1.5}, CAPACITY_RANGE),
    ("channel_capacity", {"a*": 2**64}, CAPACITY_RANGE),
    ("channel_capacity", {"a*": True}, CAPACITY_RANGE),
    ("channel_capacity", {5: 3}, "a glob (str) or a compiled regex"),
    ("channel_capacity", [("a*", 5)], "a dict of channel name patterns to capacities"),
    ("prefix", "asgi\n", "1 to 20 ASCII letters"),
]


def _shown(option, value) -> str:
    if isinstance(value, dict):
        pattern, capacity = next(iter(value.items()))
        return f"{option}[{pattern!r}]={capacity!r}"
    return f"{option}={value!r}"


@pytest.mark.parametrize(("option", "value", "accepted"), BAD_VALUES)
def test_a_bad_value_is_refused_at_construction_naming_option_value_and_range(
    prefix, option, value, accepted
):
    config = {"prefix": prefix, option: value}
    with pytest.raises(ValueError) as refused:
        IPCChannelLayer(**config)
    message = str(refused.value)
    assert _shown(option, value) in message and accepted in message, message
    assert not os.path.exists(shm_path(prefix))


@pytest.mark.parametrize(
    "config", [{"expiry": 1e300}, {"channel_capacity": {"c*": "10"}}, {"expiry": math.nan}]
)
def test_a_configuration_mistake_never_surfaces_as_a_damaged_store(prefix, config):
    """These were accepted, then failed on every send (the first two as StoreCorrupted)."""

    async def run():
        try:
            layer = IPCChannelLayer(prefix=prefix, channel_memory=MiB, group_memory=MiB, **config)
        except ValueError:
            return "refused"
        try:
            await layer.send("c.x", {"n": 1})
        finally:
            await layer.close()
        return "sent"

    assert asyncio.run(run()) == "refused"
    assert not os.path.exists(shm_path(prefix))


def test_the_bounds_themselves_are_accepted_and_work(prefix):
    async def run():
        layer = IPCChannelLayer(
            prefix=prefix, channel_memory=MiB, group_memory=64 * 1024,
            expiry=10**12, group_expiry=10**12, capacity=2**63 - 1,
            channel_capacity={"b.*": 2**63 - 1},
        )
        await layer.group_add("g", "b.one")
        await layer.send("b.one", {"n": 1})
        await layer.group_send("g", {"n": 2})
        assert [await layer.receive("b.one") for _ in range(2)] == [{"n": 1}, {"n": 2}]
        await layer.close()
        for option, just_over in (("expiry", 10**12 + 0.5), ("capacity", 2**63)):
            with pytest.raises(ValueError, match=option):
                IPCChannelLayer(prefix=prefix, **{option: just_over})

    asyncio.run(run())


@pytest.mark.parametrize(
    "option",
    ["hosts", "symmetric_encryption_keys", "serializer_format", "random_prefix_length",
     "on_disconnect", "on_reconnect"],
)
def test_a_channels_redis_option_says_what_to_do_instead(option):
    with pytest.raises(TypeError) as refused:
        IPCChannelLayer(prefix="unused", **{option: None})
    message = str(refused.value)
    assert f"'{option}'" in message and "channels_redis" in message
    assert f"Remove `{option}`" in message


def test_an_unknown_option_is_named_with_a_suggestion():
    with pytest.raises(TypeError, match=r"no option 'expiri'.*did you mean 'expiry'"):
        IPCChannelLayer(prefix="unused", expiri=3)


def test_config_problems_reports_every_problem_the_layer_would_raise():
    problems = config_problems(
        {"expiry": math.nan, "hosts": ["redis"], "colour": "blue", "capacity": 5,
         "channel_capacity": {"a": 0, "b": 2}}
    )
    assert [(p.option, p.kind) for p in problems] == [
        ("expiry", "value"),
        ("hosts", "channels_redis"),
        ("colour", "unknown"),
        ("channel_capacity['a']", "value"),
    ]
    assert config_problems({"prefix": "ok", "expiry": 5, "channel_capacity": None}) == []
    for problem in problems:
        assert isinstance(problem.error(), TypeError if problem.kind != "value" else ValueError)


# --- the Django system check, run by a real `django check` ------------------------------------

def test_django_check_reports_each_problem_with_an_id_and_a_hint(tmp_path):
    code, output = django_check(tmp_path, """{
        "default": {
            "BACKEND": "asgi_ipc.IPCChannelLayer",
            "CONFIG": {"prefix": "site", "expiry": float("nan"), "hosts": [("h", 6379)]},
            "TEST_CONFIG": {"prefix": "site-test", "channel_capacity": {"x*": 0}, "expiri": 3},
        },
        "other": {"BACKEND": "asgi_ipc.layer.IPCChannelLayer", "CONFIG": ["prefix"]},
        "redis": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"hosts": 1}},
    }""")
    assert code == 1, output
    found = re.findall(r"\(asgi_ipc\.(E\d{3})\) CHANNEL_LAYERS\['(\w+)'\]\['(\w+)'\]", output)
    assert sorted(found) == sorted([
        ("E001", "other", "CONFIG"),
        ("E002", "default", "CONFIG"),
        ("E004", "default", "CONFIG"),
        ("E002", "default", "TEST_CONFIG"),
        ("E003", "default", "TEST_CONFIG"),
    ]), output
    assert "expiry=nan" in output and EXPIRY_RANGE in output
    assert "HINT: asgi_ipc needs no server" in output and "Remove `hosts`" in output
    assert "did you mean 'expiry'" in output
    # TEST_CONFIG is asgi_ipc.testing's, never Channels': its problems say so.
    test_config = [line for line in output.splitlines() if "['TEST_CONFIG']" in line]
    assert len(test_config) == 2 and all(
        "Channels never reads TEST_CONFIG: asgi_ipc.testing builds the tests' store from it"
        in line for line in test_config
    ), output
    assert "'redis'" not in output  # another backend's options are not ours to judge


def test_django_check_passes_a_good_configuration(tmp_path):
    code, output = django_check(tmp_path, """{
        "default": {
            "BACKEND": "asgi_ipc.IPCChannelLayer",
            "CONFIG": {"prefix": "site", "channel_memory": 1024 * 1024,
                       "group_memory": 1024 * 1024, "channel_capacity": {"x*": 5}},
        },
    }""")
    assert code == 0 and "no issues" in output, output
    # The same site with one mistake: the check is there, and it is what speaks.
    code, output = django_check(tmp_path, """{
        "default": {
            "BACKEND": "asgi_ipc.IPCChannelLayer",
            "CONFIG": {"prefix": "site", "channel_memory": 1024 * 1024,
                       "group_memory": 1024 * 1024, "channel_capacity": {"x*": 5.5}},
        },
    }""")
    assert code == 1 and "(asgi_ipc.E002)" in output and "5.5" in output, output


needs_a_tmpfs = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to mount a tmpfs of its own on /dev/shm",
)

# Docker's default /dev/shm.
DOCKER_SHM = "size=64m"


def layers_of(prefix: str, options: str = "") -> str:
    return (
        '{"default": {"BACKEND": "asgi_ipc.IPCChannelLayer", '
        f'"CONFIG": {{"prefix": {prefix!r}, {options}}}}}}}'
    )


def ids_in(output: str) -> list[str]:
    return re.findall(r"\(asgi_ipc\.(\w+)\)", output)


@needs_a_tmpfs
def test_a_store_the_layer_will_refuse_to_create_fails_the_check_with_the_layers_words(
    tmp_path, prefix
):
    """Docker's 64 MiB /dev/shm and the default store (100 MiB + 20 MiB): the layer's first call
    raises SharedMemoryTooSmall, so the check fails, saying just what the layer says. A
    TEST_CONFIG of the same size is not judged: the tests may run on another machine."""
    config = f'{{"prefix": {prefix!r}}}'
    code, output = django_check(
        tmp_path,
        '{"default": {"BACKEND": "asgi_ipc.IPCChannelLayer", '
        f'"CONFIG": {config}, "TEST_CONFIG": {config}}}}}',
        shm=DOCKER_SHM,
        after=f"""
            import asyncio
            from asgi_ipc import IPCChannelLayer, SharedMemoryTooSmall

            try:
                asyncio.run(IPCChannelLayer(prefix={prefix!r}).send("c", {{}}))
            except SharedMemoryTooSmall as exc:
                print("the layer said:", exc)
        """,
    )
    assert code == 1, output
    assert ids_in(output) == ["E006"], output
    check, _, runtime = output.partition("the layer said: ")
    assert runtime.strip() and runtime.strip() in check, output
    assert f"there is no store of prefix {prefix!r} yet" in check
    assert "124.3 MiB when full" in runtime and "creation reserves 4.3 MiB at once" in runtime
    assert "64.0 MiB free of 64.0 MiB" in runtime and "--shm-size" in runtime
    assert "HINT:" in check and "SILENCED_SYSTEM_CHECKS" in check


@needs_a_tmpfs
def test_a_store_that_is_there_is_used_as_it_is_whatever_the_configured_size(tmp_path, prefix):
    """The store exists, created with 8 MiB + 1 MiB: a process configured with the default sizes
    uses it as it is, so there is nothing to refuse. One configured small enough to be created
    passes too."""
    for before in (f"""
            import asyncio
            from asgi_ipc import IPCChannelLayer

            async def create():
                layer = IPCChannelLayer(prefix={prefix!r}, channel_memory=8 << 20,
                                        group_memory=1 << 20)
                await layer.send("c", {{"n": 1}})
                await layer.close()

            asyncio.run(create())
        """, ""):
        options = "" if before else '"channel_memory": 8 << 20, "group_memory": 1 << 20'
        code, output = django_check(tmp_path, layers_of(prefix, options), shm=DOCKER_SHM,
                                    before=before)
        assert code == 0 and ids_in(output) == [] and "no issues" in output, output


@needs_a_tmpfs
def test_a_store_that_is_there_but_cannot_grow_to_its_size_is_a_warning(tmp_path, prefix):
    """The store (40 MiB + 1 MiB) fitted when it was created; then 40 MiB of /dev/shm were taken
    by something else. It works, but cannot grow to its size: a warning, which says what it has
    reserved and what /dev/shm has left."""
    code, output = django_check(
        tmp_path,
        layers_of(prefix, '"channel_memory": 40 << 20, "group_memory": 1 << 20'),
        shm=DOCKER_SHM,
        before=f"""
            import asyncio
            from asgi_ipc import IPCChannelLayer

            async def create():
                layer = IPCChannelLayer(prefix={prefix!r}, channel_memory=40 << 20,
                                        group_memory=1 << 20)
                await layer.send("c", {{"n": 1}})
                await layer.close()

            asyncio.run(create())
            with open("/dev/shm/other", "wb") as other:
                other.write(bytes(40 << 20))
        """,
    )
    assert code == 0, output
    assert ids_in(output) == ["W001"], output
    assert f"the store of prefix {prefix!r} is there, and is used as it is" in output
    assert "43.1 MiB when full" in output and "is reserved so far" in output
    assert "free of 64.0 MiB" in output and "ChannelFull" in output


def test_what_the_layer_would_refuse_at_the_path_of_its_store_fails_the_check(tmp_path, prefix):
    write_object(prefix, b"not a store")
    code, output = django_check(tmp_path, layers_of(prefix))
    assert code == 1, output
    assert ids_in(output) == ["E007"], output
    assert f"asgi_ipc.{prefix} is 11 bytes, not an asgi_ipc store" in output
    assert f"asgi-ipc unlink --prefix {prefix} --force" in output
