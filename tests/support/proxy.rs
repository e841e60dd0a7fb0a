//! A loopback TCP proxy that a test can cut and restore, to make a database outage.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Forwards loopback connections to `upstream` until cut. Cutting closes every open
/// connection and refuses new ones until restored.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    /// Connections forwarded so far.
    pub accepted: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts a proxy in front of the PostgreSQL server of `url` and returns it with
    /// `url` rewritten to pass through it.
    pub async fn for_postgres(url: &str) -> (Proxy, String) {
        let mut url = reqwest::Url::parse(url).unwrap();
        let upstream: SocketAddr =
            format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
                .parse()
                .unwrap();
        let proxy = Proxy::start(upstream).await;
        url.set_port(Some(proxy.addr.port())).unwrap();
        (proxy, url.to_string())
    }

    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0);
        let accepted = Arc::new(AtomicU64::new(0));
        let proxy = Proxy {
            addr,
            open: open.clone(),
            generation: generation.clone(),
            accepted: accepted.clone(),
        };
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !open.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                accepted.fetch_add(1, Ordering::SeqCst);
                let mut cut = generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|generation| *generation += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}
