"""One NVMe controller: what a host gets from an admin Connect.  It holds the
controller registers (CC/CSTS), the negotiated features, pending Asynchronous
Event Requests and its queues.  Kept small: a node may carry many of them.
Property Get/Set follow nvmet (drivers/nvme/target/fabrics-cmd.c, core.c)."""

from . import status as st

MQES = 127                  # 0's based: 128 entries per queue
MAX_IO_QUEUES = 8           # granted at most (Set Features 0x07); hosts ask one per CPU
VS = 0x00010300             # 1.3: NS descriptor list mandatory, no CNS 8 needed
CAP = MQES | (1 << 16) | (15 << 24) | (1 << 37)   # CQR, TO 7.5 s, CSS = NVM
AER_LIMIT = 4               # AERL = 3
KAS = 10                    # keep-alive granularity, 100 ms units
DISC_KATO_MS = 120000       # a discovery controller connected with KATO 0 (nvmet)

PROP_CAP, PROP_VS, PROP_CC, PROP_CSTS, PROP_NSSR, PROP_CRTO = 0x00, 0x08, 0x14, 0x1C, 0x20, 0x68

CC_EN = 1
CC_SHN_MASK = 3 << 14
CSTS_RDY = 1
CSTS_CFS = 2
CSTS_SHST_CMPLT = 2 << 2

AEN_NS_ATTR = 1 << 8
AEN_DISC_CHANGE = 1 << 31
# AER completion dw0: type 2 (notice) | info << 8 | log page << 16
AEN_NS_CHANGED = 0x2 | (0x00 << 8) | (0x04 << 16)
AEN_DISC_CHANGED = 0x2 | (0xF0 << 8) | (0x70 << 16)


class Controller(object):
    def __init__(self, cntlid, subsys, hostnqn, hostid, kato_ms, now, discovery=False):
        self.cntlid = cntlid
        self.subsys = subsys            # a target.LiveSubsystem, None for discovery
        self.discovery = discovery
        self.hostnqn = hostnqn
        self.hostid = hostid
        self.kato_ms = kato_ms or (DISC_KATO_MS if discovery else 0)
        self.last_seen = now
        self.cc = 0
        self.csts = 0
        self.max_qid = 1 if not discovery else 0   # until Set Features 0x07
        self.aen_enabled = 0
        self.aen_masked = 0             # sent, waiting for the log read (RAE = 0)
        self.aers = []                  # cids of outstanding AERs (admin queue)
        self.events = []                # AEN dw0 waiting for an AER
        self.ns_changed = False         # changed NS log has NSID 1
        self.admin = None               # the admin Queue
        self.io_queues = {}             # qid -> Queue
        self.dead = False
        self.remote = False             # a stand-in for another worker's controller
        # Traffic-based keep-alive: the host skips Keep Alives while commands
        # complete.  Only sound when this process sees all the controller's queues.
        self.tbkas = True
        self.disc_cache = None          # (genctr, bytes) of the discovery log
        self.auth = None                # auth.HostAuth: every queue must authenticate

    @property
    def ready(self):
        return bool(self.csts & CSTS_RDY)

    def touch(self, now):
        self.last_seen = now

    def expired(self, now):
        return self.kato_ms and (now - self.last_seen) * 1000.0 > self.kato_ms + 1000

    # ---- properties ---------------------------------------------------------------
    def prop_get(self, offset, size8):
        if size8:
            if offset == PROP_CAP:
                return CAP
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        if offset == PROP_VS:
            return VS
        if offset == PROP_CC:
            return self.cc
        if offset == PROP_CSTS:
            return self.csts
        if offset == PROP_CRTO:
            return (15 << 16) | 15
        if offset == PROP_CAP:
            return CAP & 0xFFFFFFFF
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)

    def prop_set(self, offset, value, size8):
        if size8 or offset != PROP_CC:
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        value &= 0xFFFFFFFF
        old, self.cc = self.cc, value
        if value & CC_EN and not old & CC_EN:
            self._start()
        if not value & CC_EN and old & CC_EN:
            self.csts &= ~CSTS_RDY
            self.cc = 0
        shn_new, shn_old = value & CC_SHN_MASK, old & CC_SHN_MASK
        if shn_new and not shn_old:
            # Done synchronously: the host polls CSTS right after this Set.
            self.csts |= CSTS_SHST_CMPLT
        elif not shn_new and shn_old:
            self.csts &= ~CSTS_SHST_CMPLT

    def _start(self):
        cc = self.cc
        iosqes, iocqes = (cc >> 16) & 0xF, (cc >> 20) & 0xF
        mps, ams, css = (cc >> 7) & 0xF, (cc >> 11) & 0x7, (cc >> 4) & 0x7
        bad = mps != 0 or ams != 0 or css not in (0, 6)
        if not self.discovery:
            bad = bad or iosqes != 6 or iocqes != 4
        if bad:
            self.csts = CSTS_CFS
            return
        self.csts = CSTS_RDY

    # ---- features -----------------------------------------------------------------
    def aen_supported(self):
        return AEN_DISC_CHANGE if self.discovery else AEN_NS_ATTR

    def set_queue_count(self, nsqr, ncqr):
        if nsqr == 0xFFFF or ncqr == 0xFFFF or self.discovery:
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        n = min(nsqr + 1, ncqr + 1, MAX_IO_QUEUES)
        self.max_qid = n
        return (n - 1) | ((n - 1) << 16)

    def queue_count(self):
        n = max(self.max_qid, 1)
        return (n - 1) | ((n - 1) << 16)

    # ---- asynchronous events ------------------------------------------------------
    def post_event(self, dw0, bit):
        """Queue an event for the host; returns a cid to complete now, or None."""
        if not self.aen_enabled & bit or self.aen_masked & bit:
            return None
        self.aen_masked |= bit
        self.events.append(dw0)
        return self.pop_event()

    def pop_event(self):
        """(cid, dw0) when both an AER and an event are waiting."""
        if self.aers and self.events:
            return self.aers.pop(0), self.events.pop(0)
        return None
