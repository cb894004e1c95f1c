//! Typed topics.
//!
//! A [`Topic<T>`] is a concrete topic that carries payloads of type `T`; a [`Filter<T>`] is a
//! subscription pattern whose matches all carry `T`. Both are only built by the constructors
//! below, from validated [`Segment`]s, so no service formats a topic string by hand.

use std::fmt;
use std::marker::PhantomData;

use crate::payload::{
    Ack, Command, CommandResult, DeadLetter, Measurement, RawFrame, SinkRegistration, Status,
};

/// Root and version of the topic tree.
pub const PREFIX: &str = "wattbus/v1";

/// The longest segment we accept. Long enough for a serial number, short enough that a topic
/// stays readable and a hostile name cannot blow up memory.
const MAX_SEGMENT_LEN: usize = 64;

/// One level of a topic: a site, device, channel, service or stream name.
///
/// Only `[A-Za-z0-9._-]`, 1–64 characters: no `/`, `+`, `#` (they would change the topic's
/// shape), no `$` at the start (reserved by brokers), nothing invisible.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long; at most {MAX_SEGMENT_LEN} are allowed")]
    TooLong(usize),
    #[error("contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadChar(char),
}

impl Segment {
    pub fn new(s: impl Into<String>) -> Result<Self, SegmentError> {
        let s = s.into();
        if s.is_empty() {
            return Err(SegmentError::Empty);
        }
        if s.len() > MAX_SEGMENT_LEN {
            return Err(SegmentError::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(SegmentError::BadChar(c));
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl TryFrom<String> for Segment {
    type Error = SegmentError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Segment::new(s)
    }
}

impl From<Segment> for String {
    fn from(s: Segment) -> String {
        s.0
    }
}

impl serde::Serialize for Segment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Segment {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = deserialize_text(d)?;
        Segment::new(s).map_err(serde::de::Error::custom)
    }
}

/// Deserialize a string, and only a string. A number or boolean where text belongs usually
/// comes from an environment variable (`WATTBUS_SITE=42` arrives as the number 42, and `007`
/// as 7): turning it back into text could silently change it, so the error says how to quote.
pub fn deserialize_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<String, E> {
            Err(not_text("a number"))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<String, E> {
            Err(not_text("a number"))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
            Err(not_text("a number"))
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
            Err(not_text("true or false"))
        }
    }
    // The value itself is not repeated: this may be a password.
    fn not_text<E: serde::de::Error>(found: &str) -> E {
        E::custom(format!(
            "expected text, found {found}; from an environment variable, quote it so it stays \
             text (VAR='\"...\"'), or for a secret use the `_file` key"
        ))
    }
    d.deserialize_any(Text)
}

impl schemars::JsonSchema for Segment {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Segment".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "One topic level: letters, digits, '.', '_' or '-'.",
            "pattern": "^[A-Za-z0-9._-]{1,64}$"
        })
    }
}

/// Whose readings: the site, device and channel of a measurement, which its topic and its
/// payload both name.
///
/// Written once, here. A producer builds a reading from it with [`Measurement::new`] and
/// publishes it on [`Measurement::topic`], so the topic and the payload cannot name two
/// devices. Written twice, once into each, one slip at one call site would lose every reading
/// of it: a sink refuses a reading whose payload names another identity than its topic
/// ([`Payload::check_topic`]).
///
/// [`Payload::check_topic`]: crate::Payload::check_topic
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadingId {
    pub site: Segment,
    pub device: Segment,
    pub channel: Segment,
}

impl ReadingId {
    pub fn new(site: Segment, device: Segment, channel: Segment) -> Self {
        Self {
            site,
            device,
            channel,
        }
    }

    /// The topic of this identity's readings.
    ///
    /// ```
    /// use proto::{Kind, ReadingId, Segment};
    /// let seg = |s: &str| Segment::new(s).unwrap();
    /// let id = ReadingId::new(seg("home"), seg("we515-1"), seg("main"));
    /// assert_eq!(id.topic().as_str(), "wattbus/v1/home/meas/we515-1/main");
    /// let parsed = proto::parse(id.topic().as_str()).unwrap();
    /// assert_eq!(
    ///     (parsed.site, parsed.kind, parsed.rest),
    ///     (id.site, Kind::Measurement, vec![id.device, id.channel])
    /// );
    /// ```
    pub fn topic(&self) -> Topic<Measurement> {
        Topic::measurement(&self.site, &self.device, &self.channel)
    }
}

/// A concrete topic that carries `T`.
pub struct Topic<T> {
    path: String,
    _payload: PhantomData<fn() -> T>,
}

impl<T> Clone for Topic<T> {
    fn clone(&self) -> Self {
        Self {
            path: self.path.clone(),
            _payload: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Topic<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl<T> Topic<T> {
    fn build(site: &Segment, kind: &str, rest: &[&Segment]) -> Self {
        let mut path = format!("{PREFIX}/{site}/{kind}");
        for s in rest {
            path.push('/');
            path.push_str(s.as_str());
        }
        Self {
            path,
            _payload: PhantomData,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.path
    }
}

impl Topic<RawFrame> {
    /// A producer publishes a frame on [`RawFrame::topic`], which is this one built from the
    /// frame's own site and device.
    pub fn raw(site: &Segment, device: &Segment) -> Self {
        Self::build(site, Kind::Raw.as_str(), &[device])
    }
}

impl Topic<Measurement> {
    /// A producer publishes a reading on [`Measurement::topic`] (or [`ReadingId::topic`]),
    /// which is this one built from the reading's own identity; this one is for the topics a
    /// test or a tool expects.
    pub fn measurement(site: &Segment, device: &Segment, channel: &Segment) -> Self {
        Self::build(site, Kind::Measurement.as_str(), &[device, channel])
    }
}

impl Topic<Command> {
    pub fn command(site: &Segment, device: &Segment) -> Self {
        Self::build(site, Kind::Command.as_str(), &[device])
    }
}

impl Topic<CommandResult> {
    pub fn command_result(site: &Segment, device: &Segment) -> Self {
        Self::build(site, Kind::CommandResult.as_str(), &[device])
    }
}

impl Topic<Status> {
    pub fn status(site: &Segment, instance: &Segment) -> Self {
        Self::build(site, Kind::Status.as_str(), &[instance])
    }
}

impl Topic<Ack> {
    pub fn ack(site: &Segment, producer: &Segment, stream: &Segment, sink: &Segment) -> Self {
        Self::build(site, Kind::Ack.as_str(), &[producer, stream, sink])
    }
}

impl Topic<DeadLetter> {
    pub fn dead_letter(site: &Segment, service: &Segment) -> Self {
        Self::build(site, Kind::DeadLetter.as_str(), &[service])
    }
}

impl Topic<SinkRegistration> {
    /// Where sink group `group` announces, retained, the topic filters it consumes; producers
    /// learn from it whom to wait for.
    ///
    /// ```
    /// use proto::{Kind, Segment, SinkRegistration, Topic};
    /// let site = Segment::new("home").unwrap();
    /// let group = Segment::new("influx-writer").unwrap();
    /// let topic = Topic::<SinkRegistration>::sink_registration(&site, &group);
    /// assert_eq!(topic.as_str(), "wattbus/v1/home/sink/influx-writer");
    /// let parsed = proto::parse(topic.as_str()).unwrap();
    /// assert_eq!((parsed.kind, &parsed.rest[..]), (Kind::Sink, &[group][..]));
    /// ```
    pub fn sink_registration(site: &Segment, group: &Segment) -> Self {
        Self::build(site, Kind::Sink.as_str(), &[group])
    }
}

/// A subscription filter whose every match carries `T`.
pub struct Filter<T> {
    filter: String,
    _payload: PhantomData<fn() -> T>,
}

impl<T> Clone for Filter<T> {
    fn clone(&self) -> Self {
        Self {
            filter: self.filter.clone(),
            _payload: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Filter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.filter)
    }
}

impl<T> Filter<T> {
    /// `site = None` matches every site.
    fn build(site: Option<&Segment>, kind: Kind, rest: &[Option<&Segment>], tail: bool) -> Self {
        let mut filter = format!(
            "{PREFIX}/{}/{}",
            site.map_or("+", Segment::as_str),
            kind.as_str()
        );
        for s in rest {
            filter.push('/');
            filter.push_str(s.map_or("+", Segment::as_str));
        }
        if tail {
            filter.push_str("/#");
        }
        Self {
            filter,
            _payload: PhantomData,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.filter
    }

    /// The same filter as a shared subscription: the broker hands each message to one member
    /// of `group`, so several instances of a consumer split the load.
    pub fn shared(&self, group: &Segment) -> String {
        format!("$share/{group}/{}", self.filter)
    }

    /// Whether a concrete topic matches this filter (MQTT wildcard rules).
    pub fn matches(&self, topic: &str) -> bool {
        matches_filter(&self.filter, topic)
    }
}

impl Filter<RawFrame> {
    pub fn raw(site: Option<&Segment>, device: Option<&Segment>) -> Self {
        Self::build(site, Kind::Raw, &[device], false)
    }
}

impl Filter<Measurement> {
    pub fn measurements(site: Option<&Segment>, device: Option<&Segment>) -> Self {
        Self::build(site, Kind::Measurement, &[device, None], false)
    }
}

impl Filter<Command> {
    pub fn commands(site: Option<&Segment>, device: Option<&Segment>) -> Self {
        Self::build(site, Kind::Command, &[device], false)
    }
}

impl Filter<CommandResult> {
    pub fn command_results(site: Option<&Segment>, device: Option<&Segment>) -> Self {
        Self::build(site, Kind::CommandResult, &[device], false)
    }
}

impl Filter<Status> {
    pub fn statuses(site: Option<&Segment>) -> Self {
        Self::build(site, Kind::Status, &[None], false)
    }
}

impl Filter<Ack> {
    /// Acknowledgements from every sink for one producer stream.
    pub fn acks_for(site: &Segment, producer: &Segment, stream: &Segment) -> Self {
        Self::build(
            Some(site),
            Kind::Ack,
            &[Some(producer), Some(stream), None],
            false,
        )
    }
}

impl Filter<DeadLetter> {
    pub fn dead_letters(site: Option<&Segment>) -> Self {
        Self::build(site, Kind::DeadLetter, &[None], false)
    }
}

impl Filter<SinkRegistration> {
    /// Every sink group's registration on one site (what a producer subscribes).
    ///
    /// ```
    /// use proto::{Filter, Segment, SinkRegistration, Topic};
    /// let site = Segment::new("home").unwrap();
    /// let all = Filter::<SinkRegistration>::sink_registrations(&site);
    /// assert_eq!(all.as_str(), "wattbus/v1/home/sink/+");
    /// let group = Segment::new("influx-writer").unwrap();
    /// assert!(all.matches(Topic::sink_registration(&site, &group).as_str()));
    /// ```
    pub fn sink_registrations(site: &Segment) -> Self {
        Self::build(Some(site), Kind::Sink, &[None], false)
    }
}

/// Everything under the prefix, of any kind; used by `wattbus tail`.
pub fn everything() -> String {
    format!("{PREFIX}/#")
}

/// MQTT topic matching: `+` matches one level, `#` (last) matches the rest, including the
/// parent level itself.
pub fn matches_filter(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((_group, f)) => f,
            None => return false,
        },
        None => filter,
    };
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            lit => {
                if t.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    t.next().is_none()
}

/// Whether some topic matches both filters (MQTT wildcard rules; a `$share/<group>/` prefix is
/// ignored). A producer waits for a sink group when one of the group's filters overlaps the
/// filter of what its stream publishes.
///
/// ```
/// use proto::filters_overlap;
/// assert!(filters_overlap("wattbus/v1/+/meas/+/+", "wattbus/v1/home/meas/+/+"));
/// assert!(filters_overlap("wattbus/v1/home/#", "wattbus/v1/home/meas/we515-1/main"));
/// assert!(filters_overlap("$share/g/wattbus/v1/+/meas/+/+", "wattbus/v1/home/meas/d/+"));
/// // Another kind, another site, another depth: no topic matches both.
/// assert!(!filters_overlap("wattbus/v1/+/raw/+", "wattbus/v1/home/meas/+/+"));
/// assert!(!filters_overlap("wattbus/v1/lab/meas/+/+", "wattbus/v1/home/meas/+/+"));
/// assert!(!filters_overlap("wattbus/v1/+/meas/+", "wattbus/v1/home/meas/+/+"));
/// ```
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (strip_share(a).split('/'), strip_share(b).split('/'));
    loop {
        match (a.next(), b.next()) {
            // `#` also matches its parent level, so it overlaps even where the other ends.
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(x), Some(y)) => {
                if x != "+" && y != "+" && x != y {
                    return false;
                }
            }
        }
    }
}

/// A filter without its `$share/<group>/` prefix, if it has one.
fn strip_share(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_group, f)| f)
}

/// Whether `filter` is a well-formed plain (not shared) subscription filter whose literal levels
/// are valid [`Segment`]s: `+` anywhere, `#` only last.
pub(crate) fn check_filter(filter: &str) -> Result<(), String> {
    if filter.len() > 1024 {
        return Err(format!("filter of {} bytes; at most 1024", filter.len()));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "+" => {}
            "#" if i + 1 == levels.len() => {}
            lit => {
                Segment::new(lit).map_err(|e| format!("filter {filter:?}: level {lit:?} {e}"))?;
            }
        }
    }
    Ok(())
}

/// The kinds of topic in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Raw,
    Measurement,
    Command,
    CommandResult,
    Status,
    Ack,
    DeadLetter,
    Sink,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Measurement => "meas",
            Kind::Command => "cmd",
            Kind::CommandResult => "cmd-result",
            Kind::Status => "status",
            Kind::Ack => "ack",
            Kind::DeadLetter => "dead",
            Kind::Sink => "sink",
        }
    }

    /// How many segments follow the kind.
    const fn arity(self) -> usize {
        match self {
            Kind::Raw
            | Kind::Command
            | Kind::CommandResult
            | Kind::Status
            | Kind::DeadLetter
            | Kind::Sink => 1,
            Kind::Measurement => 2,
            Kind::Ack => 3,
        }
    }

    fn from_str(s: &str) -> Option<Self> {
        [
            Kind::Raw,
            Kind::Measurement,
            Kind::Command,
            Kind::CommandResult,
            Kind::Status,
            Kind::Ack,
            Kind::DeadLetter,
            Kind::Sink,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// An incoming topic taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTopic {
    pub site: Segment,
    pub kind: Kind,
    /// The segments after the kind, e.g. `[device, channel]` for a measurement or
    /// `[producer, stream, sink]` for an acknowledgement.
    pub rest: Vec<Segment>,
}

/// Take a topic apart. `None` for anything that is not a well-formed wattbus v1 topic.
pub fn parse(topic: &str) -> Option<ParsedTopic> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let site = Segment::new(parts.next()?).ok()?;
    let kind = Kind::from_str(parts.next()?)?;
    let rest: Vec<Segment> = parts.map(Segment::new).collect::<Result<_, _>>().ok()?;
    (rest.len() == kind.arity()).then_some(ParsedTopic { site, kind, rest })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> Segment {
        Segment::new(s).unwrap()
    }

    #[test]
    fn topics_have_the_documented_shape() {
        let site = seg("home");
        assert_eq!(
            Topic::measurement(&site, &seg("we515-1"), &seg("l1")).as_str(),
            "wattbus/v1/home/meas/we515-1/l1"
        );
        assert_eq!(
            Topic::ack(
                &site,
                &seg("modbus-ingest"),
                &seg("meas"),
                &seg("influx-writer")
            )
            .as_str(),
            "wattbus/v1/home/ack/modbus-ingest/meas/influx-writer"
        );
        assert_eq!(
            Topic::raw(&site, &seg("prime-1")).as_str(),
            "wattbus/v1/home/raw/prime-1"
        );
        assert_eq!(
            Topic::status(&site, &seg("broker")).as_str(),
            "wattbus/v1/home/status/broker"
        );
    }

    #[test]
    fn segments_reject_wildcards_separators_and_junk() {
        for bad in ["", "a/b", "+", "#", "$SYS", "tab\t", "ü", &"x".repeat(65)] {
            assert!(Segment::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Segment::new("WE-515_2.main").is_ok());
    }

    #[test]
    fn filters_match_what_they_should() {
        let f = Filter::measurements(None, None);
        assert_eq!(f.as_str(), "wattbus/v1/+/meas/+/+");
        assert!(f.matches("wattbus/v1/home/meas/d/c"));
        assert!(!f.matches("wattbus/v1/home/meas/d"));
        assert!(!f.matches("wattbus/v1/home/raw/d"));
        assert_eq!(
            f.shared(&seg("influx-writer")),
            "$share/influx-writer/wattbus/v1/+/meas/+/+"
        );
        assert!(matches_filter(
            "$share/g/wattbus/v1/#",
            "wattbus/v1/home/meas/d/c"
        ));
        assert!(matches_filter("wattbus/#", "wattbus"));
        assert!(!matches_filter("wattbus/+", "wattbus"));
    }

    #[test]
    fn overlap_is_symmetric_and_follows_the_wildcards() {
        let cases = [
            ("wattbus/#", "wattbus", true),
            ("wattbus/v1/+/meas/+/+", "wattbus/v1/+/meas/#", true),
            (
                "wattbus/v1/home/meas/a/+",
                "wattbus/v1/home/meas/b/+",
                false,
            ),
            (
                "wattbus/v1/home/meas/+/+",
                "wattbus/v1/home/meas/+/+/+",
                false,
            ),
            ("+/+/+/raw/+", "wattbus/v1/home/raw/ct-1", true),
        ];
        for (a, b, overlap) in cases {
            assert_eq!(filters_overlap(a, b), overlap, "{a} vs {b}");
            assert_eq!(filters_overlap(b, a), overlap, "{b} vs {a}");
        }
    }

    #[test]
    fn parse_round_trips_and_rejects_foreign_topics() {
        let t = Topic::ack(&seg("s"), &seg("p"), &seg("st"), &seg("k"));
        let p = parse(t.as_str()).unwrap();
        assert_eq!(p.kind, Kind::Ack);
        assert_eq!(p.rest, vec![seg("p"), seg("st"), seg("k")]);
        let t = Topic::<SinkRegistration>::sink_registration(&seg("s"), &seg("influx-writer"));
        let p = parse(t.as_str()).unwrap();
        assert_eq!((p.kind, p.rest), (Kind::Sink, vec![seg("influx-writer")]));
        for bad in [
            "wattbus/v1/home/sink/a/b",
            "wattbus/v2/home/meas/a/b",
            "wattbus/v1/home/meas/a",
            "wattbus/v1/home/meas/a/b/c",
            "wattbus/v1/home/nope/a",
            "wattbus/v1//meas/a/b",
            "zigbee2mqtt/bridge",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
