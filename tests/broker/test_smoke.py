from tests.conftest import read_all


def test_echo_roundtrip(make_broker):
    b = make_broker({"7.lua": 'deadend.send("hi\\n"); local d = deadend.recv(100); deadend.send(d or "nil")'})
    s = b.connect(7)
    s.sendall(b"ping")
    assert read_all(s) == b"hi\nping"
    conn = b.conn_ids(at_least=1)[0]
    assert b.session_end(conn).group(1) == "done"


def test_echo_roundtrip_on_uvloop(make_broker):
    # --event-loop uvloop (an optional extra, installed with the test extras): the same session works.
    b = make_broker(
        {"7.lua": 'deadend.send("hi\\n"); local d = deadend.recv(100); deadend.send(d or "nil")'},
        "--event-loop",
        "uvloop",
    )
    s = b.connect(7)
    s.sendall(b"ping")
    assert read_all(s) == b"hi\nping"
    assert b.session_end(b.conn_ids(at_least=1)[0]).group(1) == "done"
