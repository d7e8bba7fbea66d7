//! The flags in etcd, shared by the tier: `[rollout.store] kind = "etcd"`.
//!
//! Keys, under `<prefix>/<name>/`:
//!
//! - `flags`: the flags as TOML (the flags file's format, readable with `etcdctl`).
//!   Its `mod_revision` is the revision every write compares and swaps on.
//! - `audit/<time>-<instance>`: one JSON [`AuditRecord`] per change, written in the
//!   same transaction as the flags, so no change goes unrecorded.
//! - `stats/<instance>`: this instance's window statistics ([`Published`]), bound to
//!   its lease: they vanish when the instance dies.
//! - `leader`: the analyser's key, held with the same lease (created only when absent,
//!   so one instance holds it at a time; when its lease lapses the key goes, and the
//!   instances watching it campaign at once).
//!
//! **Fail static.** The flags in force stay while etcd is unreachable or without
//! quorum: routing reads them from memory and never waits for the store. The store
//! says so (`pitboss_rollout_store_up` 0, a `/readyz` note, a log line), retries,
//! and resyncs when etcd answers again (a linearizable read, then a watch from the
//! revision read). Every flags value it applies is also kept in `cache_file`, so a
//! restart during an outage starts on the last flags rather than on legacy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio_util::sync::CancellationToken;

use super::{AuditRecord, CasError, FlagStore, StoreError, Tier, Versioned};
use crate::config::StoreSection;
use crate::rollout::flags::Flags;
use crate::rollout::reload::{write_atomically, LiveFlags};
use crate::rollout::tier::Published;

/// The settings of the etcd store, from `[rollout.store]`.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub name: String,
    pub prefix: String,
    pub lease_ttl: Duration,
    pub timeout: Duration,
    pub cache_file: Option<PathBuf>,
    /// This instance, for its statistics key, the leader key and the audit log.
    pub instance: String,
}

impl EtcdSettings {
    pub fn from_section(s: &StoreSection, cache_file: Option<PathBuf>, instance: &str) -> Self {
        EtcdSettings {
            endpoints: s.endpoints.clone(),
            name: s.name.clone(),
            prefix: s.prefix.clone(),
            lease_ttl: s.lease_ttl.0,
            timeout: s.timeout.0,
            cache_file,
            instance: instance.to_string(),
        }
    }
}

/// The rollout's keys.
#[derive(Debug, Clone)]
struct Keys {
    flags: String,
    audit: String,
    stats: String,
    leader: String,
}

impl Keys {
    fn of(s: &EtcdSettings) -> Keys {
        let base = format!("{}/{}", s.prefix, s.name);
        Keys {
            flags: format!("{base}/flags"),
            audit: format!("{base}/audit/"),
            stats: format!("{base}/stats/"),
            leader: format!("{base}/leader"),
        }
    }
}

/// How long to wait before trying an unreachable etcd again.
const RETRY: Duration = Duration::from_millis(500);

/// How often the flags are read back while watching: a watch on a member that lost
/// quorum can go quiet instead of failing, and this read (linearizable: it needs a
/// leader) notices, and catches any event a broken watch missed.
const PROBE: Duration = Duration::from_secs(1);

pub struct EtcdStore {
    /// Itself, for the tasks it spawns and for [`FlagStore::tier`].
    me: std::sync::Weak<EtcdStore>,
    settings: EtcdSettings,
    keys: Keys,
    client: Client,
    up: AtomicBool,
    /// Since when etcd has not answered (for the note), and what it said.
    down: Mutex<Option<(String, String)>>,
    /// This instance's lease (0: none yet).
    lease: AtomicI64,
    is_leader: AtomicBool,
    leader: Mutex<Option<String>>,
    live: Mutex<Option<Arc<LiveFlags>>>,
    /// The flags in force came from the cache file, not (yet) from etcd.
    from_cache: AtomicBool,
}

impl EtcdStore {
    /// A store on `settings`. Connecting is lazy: this never fails because etcd is
    /// down, only on a malformed endpoint.
    pub async fn new(settings: EtcdSettings) -> Result<Arc<EtcdStore>, StoreError> {
        let options = ConnectOptions::new()
            .with_timeout(settings.timeout)
            .with_connect_timeout(settings.timeout)
            .with_keep_alive(Duration::from_secs(2), settings.timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let describe = describe(&settings);
        let client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Unreachable {
                store: describe,
                message: e.to_string(),
            })?;
        Ok(Arc::new_cyclic(|me| EtcdStore {
            me: me.clone(),
            keys: Keys::of(&settings),
            settings,
            client,
            up: AtomicBool::new(false),
            down: Mutex::new(None),
            lease: AtomicI64::new(0),
            is_leader: AtomicBool::new(false),
            leader: Mutex::new(None),
            live: Mutex::new(None),
            from_cache: AtomicBool::new(false),
        }))
    }

    /// The flags this store delivers to (before its first read, so that an
    /// unreachable etcd is noted on them); `from_cache`: they came from the cache.
    pub fn attach(&self, live: Arc<LiveFlags>, from_cache: bool) {
        self.from_cache.store(from_cache, Ordering::Release);
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(live);
    }

    /// The flags of the cache file, if there is a readable one.
    pub fn cached(&self) -> Option<Flags> {
        let path = self.settings.cache_file.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        match Flags::parse(&path.display().to_string(), &text) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("the rollout store's cache is unreadable, ignored: {e}");
                None
            }
        }
    }

    fn save_cache(&self, flags: &Flags, revision: u64) {
        let Some(path) = &self.settings.cache_file else {
            return;
        };
        let header = format!(
            "# The last rollout flags from {} (revision {revision}), kept by pitboss for a\n\
             # restart while etcd is unreachable. Not read otherwise; edit the key instead.\n\n",
            self.describe()
        );
        if let Err(e) = write_atomically(path, &header, &flags.to_toml()) {
            tracing::warn!(
                "cannot keep the rollout flags in the cache {}: {e}",
                path.display()
            );
        }
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unreachable {
            store: self.describe(),
            message: e.to_string(),
        }
    }

    fn unconfirmed(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unconfirmed {
            store: self.describe(),
            message: e.to_string(),
        }
    }

    /// One read of `key` with the store's timeout; a read that was not sent (the
    /// channel picked a member that is down) is tried on the others meanwhile.
    async fn get(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        let mut kv = self.client.kv_client();
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            match tokio::time::timeout_at(deadline, kv.get(key, options.clone())).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if !maybe_proposed(&e) && tries < self.settings.endpoints.len() => {}
                Ok(Err(e)) => return Err(self.unreachable(e)),
                Err(_) => {
                    return Err(self.unreachable(format!(
                        "no answer within {:?} (rollout.store.timeout)",
                        self.settings.timeout
                    )))
                }
            }
        }
    }

    /// Runs one request with the store's timeout (a balanced channel with no endpoint
    /// up would otherwise wait).
    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.settings.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unreachable(e)),
            Err(_) => Err(self.unreachable(format!(
                "no answer within {:?} (rollout.store.timeout)",
                self.settings.timeout
            ))),
        }
    }

    /// Records that etcd answered (`Ok`) or not, and says so on a change.
    fn set_up(&self, result: Result<(), &StoreError>) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match result {
            Ok(()) => {
                let was_down = self
                    .down
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .is_some();
                self.up.store(true, Ordering::Release);
                if was_down {
                    let revision = live.as_ref().map(|l| l.revision()).unwrap_or(0);
                    tracing::info!(
                        store = %self.describe(),
                        revision,
                        "the rollout store answers again: flags resynced"
                    );
                }
                if let Some(l) = &live {
                    l.set_store_note(None);
                }
            }
            Err(e) => {
                self.up.store(false, Ordering::Release);
                self.is_leader.store(false, Ordering::Release);
                let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
                let since = match &*down {
                    Some((since, _)) => since.clone(),
                    None => {
                        tracing::warn!(
                            "rollout store unreachable, serving with the flags in force \
                             (fail static) until it answers: {e}"
                        );
                        crate::rollout::controller::now_rfc3339()
                    }
                };
                *down = Some((since.clone(), e.to_string()));
                if let Some(l) = &live {
                    let (f, revision) = l.current();
                    let flags = if revision == 0 && self.from_cache.load(Ordering::Acquire) {
                        format!(
                            "the cached flags of {} ({} {})",
                            self.settings
                                .cache_file
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            crate::rollout::flags::step_of(&f),
                            f.status.state.as_str()
                        )
                    } else if revision == 0 {
                        "everything on legacy (no flags from the store yet, no cached flags)"
                            .to_string()
                    } else {
                        format!(
                            "the flags of revision {revision} ({} {})",
                            crate::rollout::flags::step_of(&f),
                            f.status.state.as_str()
                        )
                    };
                    l.set_store_note(Some(format!(
                        "rollout store unreachable since {since}: serving with {flags}; \
                         changes and automatic decisions wait for it ({e})"
                    )));
                }
            }
        }
    }

    /// Reads the flags key (linearizable).
    async fn read(&self, current: Option<&Flags>) -> Result<Option<Versioned>, StoreError> {
        let resp = self.get(self.keys.flags.as_str(), None).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        self.parse(kv, current).map(Some)
    }

    fn parse(
        &self,
        kv: &etcd_client::KeyValue,
        current: Option<&Flags>,
    ) -> Result<Versioned, StoreError> {
        let origin = format!("etcd key {}", self.keys.flags);
        let text = std::str::from_utf8(kv.value()).map_err(|e| StoreError::Invalid {
            store: self.describe(),
            message: format!("{origin}: not UTF-8: {e}"),
        })?;
        // A value written by hand may leave [status] out: it keeps the status in
        // force, as a flags file does.
        let flags = match current {
            Some(c) => Flags::parse_reload(&origin, text, c),
            None => Flags::parse(&origin, text),
        }
        .map_err(|e| StoreError::Invalid {
            store: self.describe(),
            message: e.to_string(),
        })?;
        Ok(Versioned {
            flags,
            revision: kv.mod_revision().max(0) as u64,
        })
    }

    /// Applies flags read from etcd, and keeps them in the cache.
    pub fn deliver(&self, live: &LiveFlags, v: Versioned) {
        let summary = format!(
            "{} {}",
            crate::rollout::flags::step_of(&v.flags),
            v.flags.status.state.as_str()
        );
        let flags = v.flags.clone();
        if live.apply(v.flags, v.revision) {
            self.from_cache.store(false, Ordering::Release);
            tracing::info!(revision = v.revision, flags = %summary, "rollout flags from etcd applied");
            self.save_cache(&flags, v.revision);
        }
        live.accepted();
    }

    /// Writes the flags in force when the key is absent (the tier's first instance,
    /// or a key deleted by hand): created only if still absent.
    async fn seed(&self, live: &LiveFlags) -> Result<(), StoreError> {
        let (f, _) = live.current();
        let mut record = AuditRecord::new("create", "pitboss", &self.settings.instance, &f, &f);
        record.reason = "the flags key was absent: created with the flags in force".into();
        record.at = crate::rollout::controller::now_rfc3339();
        match self.compare_and_swap(0, &f, &record).await {
            Ok(revision) => {
                tracing::info!(key = %self.keys.flags, revision, "rollout flags key created");
                live.apply((*f).clone(), revision);
                Ok(())
            }
            Err(CasError::Conflict { now, .. }) => {
                if let Some(now) = now {
                    let (flags, revision) = *now;
                    self.deliver(live, Versioned { flags, revision });
                }
                Ok(())
            }
            Err(CasError::Store(e)) => Err(e),
        }
    }

    /// One resync: read (or create) the key and apply it. Returns the revision read.
    async fn resync(&self, live: &LiveFlags) -> Result<u64, StoreError> {
        let current = live.get();
        match self.read(Some(&current)).await {
            Ok(Some(v)) => {
                let revision = v.revision;
                self.deliver(live, v);
                Ok(revision)
            }
            Ok(None) => {
                self.seed(live).await?;
                Ok(live.revision())
            }
            Err(StoreError::Invalid { message, .. }) => {
                // etcd answered; what it holds is bad. Keep the flags in force.
                live.rejected(format!(
                    "rollout flags in etcd rejected, previous flags stay in force: {message}"
                ));
                Ok(live.revision())
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps `live` in step with the key until `stop`: resync, watch, and on any
    /// failure resync again once etcd answers.
    async fn run(self: Arc<Self>, live: Arc<LiveFlags>, stop: CancellationToken) {
        loop {
            match self.resync(&live).await {
                Ok(revision) => {
                    self.set_up(Ok(()));
                    self.follow(&live, revision, &stop).await;
                }
                Err(e) => self.set_up(Err(&e)),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Watches the flags key from `revision + 1` until the watch fails or `stop`;
    /// probes the key every [`PROBE`] meanwhile.
    async fn follow(&self, live: &LiveFlags, revision: u64, stop: &CancellationToken) {
        let mut watch = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(revision as i64 + 1);
        let stream = match self
            .timed(watch.watch(self.keys.flags.as_str(), Some(options)))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                self.set_up(Err(&e));
                return;
            }
        };
        let (_sender, mut events) = stream.split();
        let mut probe = tokio::time::interval(PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                msg = events.message() => match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            let e = self.unreachable(format!("watch cancelled: {}", resp.cancel_reason()));
                            tracing::info!("{e}; resyncing");
                            return;
                        }
                        for event in resp.events() {
                            let Some(kv) = event.kv() else { continue };
                            match event.event_type() {
                                EventType::Put => match self.parse(kv, Some(&live.get())) {
                                    Ok(v) => self.deliver(live, v),
                                    Err(e) => live.rejected(format!(
                                        "rollout flags in etcd rejected, previous flags stay in force: {e}"
                                    )),
                                },
                                EventType::Delete => {
                                    tracing::warn!(key = %self.keys.flags, "the rollout flags key was deleted: the flags in force stay, and are written back");
                                    if let Err(e) = self.seed(live).await {
                                        self.set_up(Err(&e));
                                    }
                                }
                            }
                        }
                    }
                    Ok(None) => {
                        self.set_up(Err(&self.unreachable("the watch ended")));
                        return;
                    }
                    Err(e) => {
                        self.set_up(Err(&self.unreachable(e)));
                        return;
                    }
                },
                _ = probe.tick() => match self.resync(live).await {
                    Ok(_) => self.set_up(Ok(())),
                    Err(e) => self.set_up(Err(&e)),
                },
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The lease: granted, kept alive every third of its TTL, granted anew when it
    /// lapsed (an outage longer than the TTL); revoked on `stop`, so this instance's
    /// statistics and leadership go at once on a graceful shutdown.
    async fn keep_lease(self: Arc<Self>, stop: CancellationToken) {
        let ttl = self.settings.lease_ttl;
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let id = self.lease.load(Ordering::Acquire);
            let alive = if id == 0 {
                false
            } else {
                self.keep_alive(id).await
            };
            if !alive {
                self.is_leader.store(false, Ordering::Release);
                let mut lease = self.client.lease_client();
                match self
                    .timed(lease.grant(ttl.as_secs().max(2) as i64, None))
                    .await
                {
                    Ok(r) => self.lease.store(r.id(), Ordering::Release),
                    Err(e) => {
                        self.lease.store(0, Ordering::Release);
                        tracing::debug!("cannot get a lease from etcd: {e}");
                        continue;
                    }
                }
            }
            self.campaign().await;
        }
        let id = self.lease.swap(0, Ordering::AcqRel);
        self.is_leader.store(false, Ordering::Release);
        if id != 0 {
            let mut lease = self.client.lease_client();
            let _ = self.timed(lease.revoke(id)).await;
        }
    }

    /// One keep-alive of lease `id`; false when it lapsed or etcd did not answer.
    async fn keep_alive(&self, id: i64) -> bool {
        let mut lease = self.client.lease_client();
        let once = async {
            let (mut keeper, mut stream) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()).unwrap_or(0))
        };
        matches!(self.timed(once).await, Ok(ttl) if ttl > 0)
    }

    /// Takes the leader key if nobody holds it; learns who does otherwise.
    async fn campaign(&self) {
        let id = self.lease.load(Ordering::Acquire);
        if id == 0 {
            return;
        }
        let key = self.keys.leader.as_str();
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.settings.instance.as_str(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.client.kv_client();
        let resp = match self.timed(kv.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("cannot campaign for the analyser's key: {e}");
                return;
            }
        };
        let (leader, lease) = if resp.succeeded() {
            (Some(self.settings.instance.clone()), id)
        } else {
            let held = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())),
                _ => None,
            });
            match held {
                Some((who, lease)) => (Some(who), lease),
                None => (None, 0),
            }
        };
        let mine = lease == id;
        if mine && !self.is_leader.load(Ordering::Acquire) {
            tracing::info!(instance = %self.settings.instance, "this instance analyses the tier now");
        }
        self.is_leader.store(mine, Ordering::Release);
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = leader;
    }

    /// Campaigns as soon as the leader key goes (its holder died or stopped), so the
    /// analysis moves within the lease's TTL of the holder's last keep-alive.
    async fn watch_leader(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let mut watch = self.client.watch_client();
            let stream = self
                .timed(watch.watch(self.keys.leader.as_str(), None))
                .await;
            let Ok(stream) = stream else {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = stop.cancelled() => return,
                }
            };
            let (_sender, mut events) = stream.split();
            loop {
                tokio::select! {
                    msg = events.message() => match msg {
                        Ok(Some(resp)) => {
                            if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                                self.campaign().await;
                            }
                            if resp.canceled() {
                                break;
                            }
                        }
                        _ => break,
                    },
                    _ = stop.cancelled() => return,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Whether a failed request may have reached etcd (false: surely not sent, so safe
/// to send again to another member); for a write, whether it may have been
/// proposed, so that etcd may still commit it. Only two failures are known to leave
/// nothing behind: no connection to any member (nothing was sent) and "no leader"
/// (a member refuses a request before proposing it under `require_leader`).
/// Anything else (a timeout, "leader changed", a connection lost mid-request) may
/// have reached the log of a leader that had just lost its quorum, which commits it
/// once the quorum is back: seen in `tests/etcd_tier.rs`.
fn maybe_proposed(e: &etcd_client::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    let not_sent = [
        "tcp connect error",
        "connection refused",
        "error trying to connect",
    ]
    .iter()
    .any(|m| text.contains(m));
    !(not_sent || text.contains("etcdserver: no leader"))
}

fn describe(s: &EtcdSettings) -> String {
    format!(
        "etcd {} key {}/{}/flags",
        s.endpoints.join(","),
        s.prefix,
        s.name
    )
}

#[tonic::async_trait]
impl FlagStore for EtcdStore {
    fn describe(&self) -> String {
        describe(&self.settings)
    }

    fn up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    async fn load(&self) -> Result<Option<Versioned>, StoreError> {
        let current = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.get());
        let r = self.read(current.as_deref()).await;
        match &r {
            Ok(_) => self.set_up(Ok(())),
            Err(e @ StoreError::Unreachable { .. }) => self.set_up(Err(e)),
            Err(_) => {}
        }
        r
    }

    fn watch(&self, live: Arc<LiveFlags>, stop: CancellationToken) {
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(live.clone());
        let Some(me) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(me.clone().run(live, stop.clone()));
        tokio::spawn(me.clone().keep_lease(stop.clone()));
        tokio::spawn(me.watch_leader(stop));
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        flags: &Flags,
        record: &AuditRecord,
    ) -> Result<u64, CasError> {
        let key = self.keys.flags.as_str();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let audit_key = format!("{}{nanos:020}-{}", self.keys.audit, self.settings.instance);
        let audit = serde_json::to_string(record).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key,
                CompareOp::Equal,
                expected as i64,
            )])
            .and_then([
                TxnOp::put(key, flags.to_toml(), None),
                TxnOp::put(audit_key, audit, None),
            ])
            .or_else([TxnOp::get(key, None)]);
        let mut kv = self.client.kv_client();
        // A write that was not sent (the channel picked a member that is down) is
        // tried on the others, within the one timeout: it cannot apply twice.
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut tries = 0;
        let sent = loop {
            tries += 1;
            let r = tokio::time::timeout_at(deadline, kv.txn(txn.clone())).await;
            match &r {
                Ok(Err(e)) if !maybe_proposed(e) && tries < self.settings.endpoints.len() => {}
                _ => break r,
            }
        };
        let resp = match sent {
            Ok(Ok(r)) => {
                self.set_up(Ok(()));
                r
            }
            Ok(Err(e)) => {
                let e = if maybe_proposed(&e) {
                    self.unconfirmed(e)
                } else {
                    self.unreachable(e)
                };
                self.set_up(Err(&e));
                return Err(e.into());
            }
            Err(_) => {
                let e = self.unconfirmed(format!(
                    "no answer within {:?} (rollout.store.timeout)",
                    self.settings.timeout
                ));
                self.set_up(Err(&e));
                return Err(e.into());
            }
        };
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64;
            self.save_cache(flags, revision);
            return Ok(revision);
        }
        let now = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let (current, by, now) = match now {
            Some(kv) => match self.parse(&kv, Some(flags)) {
                Ok(v) => (
                    v.revision,
                    v.flags.status.changed_by.clone(),
                    Some(Box::new((v.flags, v.revision))),
                ),
                Err(_) => (kv.mod_revision().max(0) as u64, String::new(), None),
            },
            None => (0, String::new(), None),
        };
        Err(CasError::Conflict {
            expected,
            current,
            by,
            now,
        })
    }

    async fn history(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(limit as i64);
        let resp = self.get(self.keys.audit.as_str(), Some(options)).await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let mut r: AuditRecord = serde_json::from_slice(kv.value()).ok()?;
                r.revision = kv.create_revision().max(0) as u64;
                Some(r)
            })
            .collect())
    }

    fn tier(&self) -> Option<Arc<dyn Tier>> {
        self.me.upgrade().map(|me| me as Arc<dyn Tier>)
    }
}

#[tonic::async_trait]
impl Tier for EtcdStore {
    async fn publish(&self, stats: &Published) -> Result<(), StoreError> {
        let id = self.lease.load(Ordering::Acquire);
        if id == 0 {
            return Err(self.unreachable("no lease yet: the statistics wait for one"));
        }
        let key = format!("{}{}", self.keys.stats, self.settings.instance);
        let value = serde_json::to_string(stats).unwrap_or_default();
        let mut kv = self.client.kv_client();
        self.timed(kv.put(key, value, Some(PutOptions::new().with_lease(id))))
            .await
            .map(|_| ())
    }

    async fn gather(&self) -> Result<Vec<Published>, StoreError> {
        let resp = self
            .get(
                self.keys.stats.as_str(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| match serde_json::from_slice::<Published>(kv.value()) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::debug!(key = %String::from_utf8_lossy(kv.key()), "unreadable statistics left out: {e}");
                    None
                }
            })
            .collect())
    }

    fn is_leader(&self) -> bool {
        self.is_leader.load(Ordering::Acquire) && self.up()
    }

    fn leader(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn only_a_request_surely_not_sent_counts_as_nothing_written() {
        // Nothing reached etcd, or a member refused it before proposing.
        for e in [
            status(tonic::Code::Unavailable, "tcp connect error"),
            status(tonic::Code::Unavailable, "etcdserver: no leader"),
            etcd_client::Error::InvalidArgs("Connection refused (os error 111)".into()),
        ] {
            assert!(!maybe_proposed(&e), "{e}");
        }
        // It may be in a leader's log: etcd may still commit it.
        for e in [
            status(tonic::Code::Unavailable, "etcdserver: request timed out"),
            status(tonic::Code::Unavailable, "etcdserver: leader changed"),
            status(tonic::Code::Unknown, "h2 protocol error: connection reset"),
            status(tonic::Code::Cancelled, "operation was canceled"),
        ] {
            assert!(maybe_proposed(&e), "{e}");
        }
    }
}
