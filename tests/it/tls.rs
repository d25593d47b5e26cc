//! `amqps://` against a private RabbitMQ node with a TLS listener, using certificates the test
//! makes with `openssl`: a worker and a client trusting the test CA enqueue and invoke over TLS;
//! an unrelated CA, no CA (system roots only) and a host name the certificate does not name fail
//! at once with [`warren_core::Error::Tls`]; a client certificate from the test CA is accepted
//! for mutual TLS and one from the unrelated CA is refused. The shared broker is not touched.

use crate::common;
use crate::support;
use warren::Task;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{poll, unique};
use serde::{Deserialize, Serialize};
use support::broker_node::BrokerNode;
use warren::{Client, ClientError, Context, QueueType, Service, TaskError, Worker};
use warren_core::{AmqpConfig, Broker, Error, ReconnectPolicy};

#[derive(Serialize, Deserialize, Debug)]
struct Sum {
    a: i64,
    b: i64,
}

/// A temp folder with the test's certificates and keys; deleted on drop.
struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `ca` (the broker's CA), `server` (issued by `ca` for DNS:localhost and IP:127.0.0.1),
    /// `other-ca` (unrelated), `client` (issued by `ca`) and `rogue-client` (by `other-ca`).
    fn make() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "warren-tls-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir(&dir).expect("creating the PKI folder");
        let pki = Pki { dir };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (ca, cn) in [("ca", "warren test CA"), ("other-ca", "unrelated CA")] {
            let subj = format!("/CN={cn}");
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
            args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
            args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
            pki.openssl(&args);
        }
        std::fs::write(
            pki.path("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
             basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            pki.path("client.ext"),
            "basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for (name, cn, ca, ext) in [
            ("server", "localhost", "ca", "server.ext"),
            ("client", "warren-client", "ca", "client.ext"),
            ("rogue-client", "rogue-client", "other-ca", "client.ext"),
        ] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let subj = format!("/CN={cn}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            pki.openssl(&args);
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            pki.openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("running openssl (is it installed?)");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A config for `url` that gives up after `give_up` (long enough to show a TLS failure is
/// not retried when it fails much sooner).
fn config(url: &str, give_up: Duration) -> AmqpConfig {
    AmqpConfig::new(url)
        .expect("URL parses")
        .with_queue_type(QueueType::Classic)
        .with_connect_timeout(Duration::from_secs(5))
        .with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            give_up_after: Some(give_up),
        })
}

/// Connects with `cfg`, expects an [`Error::Tls`] well before the reconnect policy would give
/// up, and returns its text (checked for credentials).
async fn expect_tls_error(what: &str, cfg: AmqpConfig) -> String {
    let started = Instant::now();
    let err = Broker::connect(cfg)
        .await
        .expect_err(&format!("{what}: connecting must fail"));
    let took = started.elapsed();
    let text = format!("{err}");
    let debug = format!("{err:?}");
    eprintln!("{what}: {text}\n  debug: {debug}\n  after {took:?}");
    assert!(
        matches!(err, Error::Tls { .. }),
        "{what}: expected Error::Tls, got {debug}"
    );
    assert!(!err.is_transient(), "{what}: a TLS error is not transient");
    assert!(text.contains("TLS certificate problem"), "{what}: {text}");
    assert!(
        !text.contains("guest:guest") && !debug.contains("guest:guest"),
        "{what}: the password leaked: {text} / {debug}"
    );
    assert!(
        took < Duration::from_secs(5),
        "{what}: took {took:?}; a TLS failure must not be retried until the policy gives up"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca() {
    let pki = Pki::make();
    let tls_port = BrokerNode::reserve_port().expect("a free port for TLS");
    let p = |name: &str| pki.path(name).display().to_string();
    // verify_peer with fail_if_no_peer_cert = false: clients without a certificate are let in,
    // and a client certificate, when presented, must come from the test CA.
    let conf = format!(
        "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
         listeners.ssl.2 = 127.0.0.2:{tls_port}\n\
         ssl_options.cacertfile = {ca}\n\
         ssl_options.certfile = {cert}\n\
         ssl_options.keyfile = {key}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = false\n",
        ca = p("ca.pem"),
        cert = p("server.pem"),
        key = p("server.key"),
    );
    let node = BrokerNode::start_with_config(&conf)
        .await
        .expect("private RabbitMQ node with a TLS listener starts");
    let url = format!("amqps://guest:guest@localhost:{tls_port}/%2f");

    // 1. A worker and a client trusting the test CA: enqueue and invoke over TLS.
    let trusted = config(&url, Duration::from_secs(30))
        .with_tls_ca_file(pki.path("ca.pem"))
        .expect("the CA file is read");
    assert_eq!(trusted.tls_ca_file(), Some(pki.path("ca.pem").as_path()));
    let svc = unique("tls");
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let recorded = seen.clone();
    let service = Service::new(&svc)
        .method("add", |_: Context, s: Sum| async move {
            Ok::<_, TaskError>(s.a + s.b)
        })
        .method("record", move |_: Context, n: u64| {
            let seen = recorded.clone();
            async move {
                seen.lock().unwrap().push(n);
                Ok::<_, TaskError>(())
            }
        });
    let worker = Worker::builder()
        .amqp(trusted.clone())
        .service(service)
        .build()
        .await
        .expect("worker connects over amqps");
    let running = common::run_in_background(worker);
    let client = Client::builder()
        .amqp(trusted.clone())
        .invoke_timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("client connects over amqps");
    let sum: i64 = client
        .invoke(Task::new(format!("{svc}.add"), &Sum { a: 2, b: 40 }))
        .await
        .expect("invoke over amqps");
    assert_eq!(sum, 42);
    client
        .enqueue(Task::new(format!("{svc}.record"), &7u64))
        .await
        .expect("enqueue over amqps");
    poll("the enqueued task ran", Duration::from_secs(20), || {
        let seen = seen.clone();
        async move { seen.lock().unwrap().contains(&7).then_some(()) }
    })
    .await;
    let (vhost, user) = client.broker().identity().await.unwrap();
    assert_eq!((vhost.as_str(), user.as_str()), ("/", "guest"));
    // The broker sees TLS connections (the plain listener is on another port anyway).
    let conns = node
        .rabbitmqctl(&["list_connections", "port", "ssl", "--quiet"])
        .await
        .unwrap();
    let tls_conns = conns
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&tls_port.to_string().as_str()) && f.get(1) == Some(&"true")
        })
        .count();
    assert!(
        tls_conns >= 2,
        "worker and client connections use TLS: {conns}"
    );
    running.stop_cleanly().await;
    client.close().await;

    // 2. An unrelated CA: the server's certificate is not trusted.
    let text = expect_tls_error(
        "unrelated CA",
        config(&url, Duration::from_secs(20))
            .with_tls_ca_file(pki.path("other-ca.pem"))
            .unwrap(),
    )
    .await;
    assert!(text.contains("not issued by a trusted CA"), "{text}");
    assert!(text.contains("WARREN_AMQP_CA_FILE"), "{text}");

    // 3. No CA configured: the system's roots do not include the test CA.
    let text = expect_tls_error("system roots only", config(&url, Duration::from_secs(20))).await;
    assert!(text.contains("not issued by a trusted CA"), "{text}");

    // The same through the client: its error wraps the broker's, unchanged.
    let err = Client::builder()
        .amqp(
            config(&url, Duration::from_secs(20))
                .with_tls_ca_file(pki.path("other-ca.pem"))
                .unwrap(),
        )
        .connect()
        .await
        .expect_err("client with the wrong CA");
    assert!(
        matches!(err, ClientError::Broker(Error::Tls { .. })),
        "{err:?}"
    );

    // 4. A host name the certificate does not name (it names localhost and 127.0.0.1).
    let wrong_host = format!("amqps://guest:guest@127.0.0.2:{tls_port}/%2f");
    let text = expect_tls_error(
        "wrong host name",
        config(&wrong_host, Duration::from_secs(20))
            .with_tls_ca_file(pki.path("ca.pem"))
            .unwrap(),
    )
    .await;
    assert!(
        text.contains("not valid for the host name \"127.0.0.2\""),
        "{text}"
    );
    // ... while 127.0.0.1, named in the certificate, works.
    let by_ip = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let broker = Broker::connect(
        config(&by_ip, Duration::from_secs(20))
            .with_tls_ca_file(pki.path("ca.pem"))
            .unwrap(),
    )
    .await
    .expect("connecting by the IP address the certificate names");
    broker.close().await;

    // 5. Mutual TLS: a client certificate from the broker's CA is accepted, one from the
    //    unrelated CA is refused by the server.
    let with_cert = config(&url, Duration::from_secs(20))
        .with_tls_ca_file(pki.path("ca.pem"))
        .unwrap()
        .with_tls_client_cert(pki.path("client.pem"), pki.path("client.key"))
        .expect("client certificate and key are read");
    let shown = format!("{with_cert:?}");
    assert!(
        shown.contains("client.pem") && !shown.contains("PRIVATE KEY"),
        "{shown}"
    );
    let broker = Broker::connect(with_cert)
        .await
        .expect("a client certificate from the broker's CA is accepted");
    broker.declare_exchanges().await.expect("works over mTLS");
    broker.close().await;
    let text = expect_tls_error(
        "client certificate from an unrelated CA",
        config(&url, Duration::from_secs(20))
            .with_tls_ca_file(pki.path("ca.pem"))
            .unwrap()
            .with_tls_client_cert(pki.path("rogue-client.pem"), pki.path("rogue-client.key"))
            .unwrap(),
    )
    .await;
    assert!(text.contains("refused the client certificate"), "{text}");

    // 6. amqps:// to the plain AMQP port is not a certificate problem: it is retried like any
    //    connect failure and ends as `Unavailable` when the policy gives up.
    let plain = format!("amqps://guest:guest@localhost:{}/%2f", node.port());
    let err = Broker::connect(
        config(&plain, Duration::from_millis(600))
            .with_tls_ca_file(pki.path("ca.pem"))
            .unwrap(),
    )
    .await
    .expect_err("amqps:// to a plain port fails");
    eprintln!("amqps to the plain port: {err} / source: {:?}", {
        use std::error::Error as _;
        err.source().map(ToString::to_string)
    });
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");

    // 7. Unusable files are configuration errors, before any connection.
    let missing = pki.path("missing.pem");
    let err = config(&url, Duration::from_secs(1))
        .with_tls_ca_file(&missing)
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let err = config(&url, Duration::from_secs(1))
        .with_tls_ca_file(pki.path("server.ext"))
        .unwrap_err();
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
    let err = config(&url, Duration::from_secs(1))
        .with_tls_client_cert(pki.path("client.pem"), pki.path("client.pem"))
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(!err.to_string().contains("BEGIN"), "{err}");

    drop(node);
    drop(pki);
}
