//! Free loopback ports for servers started by tests.

use std::net::TcpListener;

/// A port that was free on 127.0.0.1 a moment ago. The listener is dropped before the server
/// binds, so a race is possible but rare; servers that fail to bind make the test fail loudly.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
