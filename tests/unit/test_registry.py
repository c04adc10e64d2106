import pytest

from kdpipe.registry import Registry, UnknownNameError


def test_register_get_and_unknown_lists_names():
    reg: Registry = Registry("widget")

    @reg.register()
    def small():
        return 1

    @reg.register("big_one")
    def big():
        return 2

    assert reg.get("small") is small and reg.get("big_one") is big
    assert reg.names() == ["big_one", "small"] and "small" in reg and len(reg) == 2
    with pytest.raises(UnknownNameError) as info:
        reg.get("smal")
    assert str(info.value) == "unknown widget 'smal'; did you mean 'small'? known: big_one, small"
    assert info.value.exit_code == 2
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("small")(big)
