include $(sort $(wildcard $(BR2_EXTERNAL_SDWAN_PATH)/package/*/*.mk))
