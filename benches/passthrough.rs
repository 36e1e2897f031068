//! A bare Pingora reverse proxy with nothing in it: the baseline the load
//! script compares Tollgate with. Usage: passthrough LISTEN UPSTREAM THREADS
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// The same allocator as the `tollgate` binary, so the comparison measures
/// Tollgate's work, not the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Passthrough(std::net::SocketAddr);

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args.get(1).expect("LISTEN");
    let upstream: std::net::SocketAddr = args
        .get(2)
        .expect("UPSTREAM")
        .parse()
        .expect("UPSTREAM addr");
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let conf = ServerConf {
        threads,
        upstream_keepalive_pool_size: 256,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, Passthrough(upstream));
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
