import httpx


def test_registry_fixture_serves_v2(registry, auth_registry):
    assert httpx.get(f"{registry.url}/v2/").status_code == 200
    assert httpx.get(f"{auth_registry.url}/v2/").status_code == 401
    assert httpx.get(f"{auth_registry.url}/v2/", auth=("kaito", "s3cret-pa55word")).status_code == 200
