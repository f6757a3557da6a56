//! A user's push devices: registering, removing, listing them (what push sends to).

use serde::Serialize;

use super::limits::check_id;
use super::{Engine, EngineError, EngineResult, ErrorCode, backend};
use crate::device::PushDevice;
use crate::push::ProviderKind;

/// The reply to registering a device.
#[derive(Debug, Serialize)]
pub struct DeviceSaved {
    /// The user.
    pub user: String,
    /// The registration as stored.
    pub device: PushDevice,
}

/// The reply to removing a device.
#[derive(Debug, Serialize)]
pub struct DeviceRemoved {
    /// The user.
    pub user: String,
    /// The device id.
    pub device: String,
    /// Always true (an unknown device is `not_found`).
    pub removed: bool,
}

/// A user's devices.
#[derive(Debug, Serialize)]
pub struct Devices {
    /// The user.
    pub user: String,
    /// Their registrations, by device id.
    pub devices: Vec<PushDevice>,
}

impl Engine {
    /// Registers (or replaces) a push device.
    pub async fn put_device(&self, user: &str, device: PushDevice) -> EngineResult<DeviceSaved> {
        check_id("user", user)?;
        check_id("device", &device.device)?;
        self.check_registration(&device)?;
        backend(
            "devices.put_device",
            self.backends.devices.put_device(user, device.clone()),
        )
        .await?;
        Ok(DeviceSaved {
            user: user.into(),
            device,
        })
    }

    /// The device's provider must be configured here and accept its token / subscription shape
    /// (nothing could ever be sent to it otherwise).
    fn check_registration(&self, d: &PushDevice) -> EngineResult<()> {
        let bad = |m: String| EngineError::new(ErrorCode::BadFrame, m);
        let kind = ProviderKind::parse(&d.provider)
            .ok_or_else(|| bad("provider: fcm, apns, webpush or webhook".into()))?;
        let provider = self.inner.push.get(kind).ok_or_else(|| {
            bad(format!(
                "provider: {} is not configured on this server ([push.{}])",
                kind.as_str(),
                kind.as_str()
            ))
        })?;
        provider
            .check_registration(d.token.as_deref(), d.subscription.as_ref())
            .map_err(bad)
    }

    /// Removes a push device; `not_found` when there is none.
    pub async fn delete_device(&self, user: &str, device: &str) -> EngineResult<DeviceRemoved> {
        check_id("user", user)?;
        check_id("device", device)?;
        if !backend(
            "devices.delete_device",
            self.backends.devices.delete_device(user, device),
        )
        .await?
        {
            return Err(EngineError::new(ErrorCode::NotFound, "no such device"));
        }
        Ok(DeviceRemoved {
            user: user.into(),
            device: device.into(),
            removed: true,
        })
    }

    /// A user's push devices.
    pub async fn devices(&self, user: &str) -> EngineResult<Devices> {
        check_id("user", user)?;
        let devices = backend("devices.devices", self.backends.devices.devices(user)).await?;
        Ok(Devices {
            user: user.into(),
            devices,
        })
    }
}
