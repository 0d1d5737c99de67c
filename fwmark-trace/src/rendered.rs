//! Values that many events share (a named point, a segment, an attribution) are built once per
//! cache entry in the decoder; this wraps one with its JSON, rendered once too, so writing an
//! event copies those parts instead of escaping the same strings again for every event.
use std::{ops::Deref, sync::Arc};

use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

#[derive(Debug)]
pub struct Rendered<T> {
    value: T,
    json: Box<RawValue>,
}

impl<T: Serialize> Rendered<T> {
    pub fn new(value: T) -> Arc<Self> {
        let json = serde_json::value::to_raw_value(&value)
            .expect("event parts are plain data and always serialise");
        Arc::new(Self { value, json })
    }
}

impl<T> Deref for Rendered<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Serialize for Rendered<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_as_the_value_would() {
        #[derive(Serialize)]
        struct P {
            name: &'static str,
            n: u32,
        }
        let r = Rendered::new(P { name: "a\"b", n: 7 });
        assert_eq!(r.n, 7);
        let direct = serde_json::to_value(P { name: "a\"b", n: 7 }).unwrap();
        assert_eq!(serde_json::to_value(&*r).unwrap(), direct);
        assert_eq!(
            serde_json::to_string(&*r).unwrap(),
            r#"{"name":"a\"b","n":7}"#
        );
    }
}
